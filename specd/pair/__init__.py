"""The bundled tiny draft/target model pair: training recipe (``train``) and report (``report``)."""
