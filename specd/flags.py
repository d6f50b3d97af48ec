"""Command-line flags derived from the settings model: each flag is written once, on its field.

``SETTING_FLAGS`` says which flag spells which ``section.key`` of ``common.settings.Settings`` and
in which group it appears; the type, choices, help text (the field's docstring) and default come
from the field. A command in any module adds them to its own argparse parser with
``add_setting_flags(parser, "common", "target", ...)``; ``specd.cli.settings_from_args`` then
reads them back through ``FLAG_TO_SETTING``.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.settings import MODEL_PAIRS, Settings
from specd.failures import USAGE


@dataclass(frozen=True)
class SettingFlag:
    setting: str  # "section.key" of common.settings.Settings
    flag: str  # e.g. "--redis-url"
    dest: str = ""  # argparse dest; default: the flag's name with underscores


SETTING_FLAGS: dict[str, list[SettingFlag]] = {
    "common": [
        SettingFlag("redis.url", "--redis-url"),
        SettingFlag("models.dtype", "--dtype"),
        SettingFlag("models.torch_threads", "--torch-threads"),
        SettingFlag("log.level", "--log-level"),
        SettingFlag("log.format", "--log-format"),
    ],
    "target": [
        SettingFlag("models.target", "--target-model"),
        SettingFlag("models.target_device", "--target-device"),
    ],
    "batching": [
        SettingFlag("verifier.max_batch_sessions", "--max-batch-sessions"),
        SettingFlag("verifier.max_batch_tokens", "--max-batch-tokens"),
    ],
    "draft": [
        SettingFlag("models.draft", "--draft-model"),
        SettingFlag("edge.backend", "--backend"),
        SettingFlag("edge.device", "--device"),
        SettingFlag("edge.device_fallback", "--device-fallback"),
        SettingFlag("edge.precision", "--precision"),
        SettingFlag("edge.cache_dir", "--draft-cache-dir"),
        SettingFlag("edge.gamma", "--gamma"),
        SettingFlag("edge.adaptive_gamma", "--adaptive-gamma"),
        SettingFlag("edge.gamma_min", "--gamma-min"),
        SettingFlag("edge.gamma_max", "--gamma-max"),
        SettingFlag("edge.draft_ahead", "--draft-ahead"),
        SettingFlag("edge.draft_confidence", "--draft-confidence"),
        SettingFlag("edge.draft_open_confidence", "--draft-open-confidence"),
        SettingFlag("edge.max_support", "--max-support"),
        SettingFlag("edge.tenant", "--tenant"),
        SettingFlag("sampling.temperature", "--temperature"),
        SettingFlag("sampling.top_p", "--top-p"),
        SettingFlag("sampling.top_k", "--top-k"),
        SettingFlag("sampling.seed", "--seed"),
        SettingFlag("sampling.max_new_tokens", "--max-new-tokens"),
        SettingFlag("edge.replay_file", "--replay-file"),
        SettingFlag("edge.replay_acceptance", "--replay-acceptance"),
        SettingFlag("edge.network_delay_ms", "--network-delay-ms"),
        SettingFlag("edge.network_jitter_ms", "--network-jitter-ms"),
        SettingFlag("edge.multiplex_verdicts", "--multiplex-verdicts"),
    ],
    "operations": [
        SettingFlag("metrics.port", "--metrics-port"),
        SettingFlag("metrics.host", "--metrics-host"),
        SettingFlag("log.redis_stream", "--log-redis-stream"),
    ],
    "verifier-id": [
        SettingFlag("verifier.worker_id", "--worker-id", "verifier_worker_id"),
    ],
    "edge-id": [
        SettingFlag("edge.worker_id", "--worker-id", "edge_worker_id"),
    ],
    "serve": [
        SettingFlag("serve.host", "--host"),
        SettingFlag("serve.port", "--port"),
        SettingFlag("serve.max_concurrent", "--max-concurrent"),
        SettingFlag("serve.queue_size", "--queue-size"),
        SettingFlag("serve.queue_timeout_s", "--queue-timeout"),
        SettingFlag("serve.model_name", "--model-name"),
    ],
}
GROUP_TITLES = {"common": "settings (override settings.toml and SPECD_* variables)",
                "target": "target model", "batching": "verifier batching",
                "draft": "draft model and sampling", "operations": "operations",
                "verifier-id": "worker", "edge-id": "worker", "serve": "HTTP server"}

# Filled as flags are added: argparse dest -> (section, key); settings_from_args reads it.
FLAG_TO_SETTING: dict[str, tuple[str, str]] = {}
_FLAG_OF: dict[str, str] = {}  # "section.key" -> flag, to blame a bad value on its flag

URL_HELP = {  # commands where an empty redis.url does not mean "embedded"
    "needs-url": "URL of the pool's Redis: redis://, rediss:// or unix:// (required: "
                 "--redis-url or SPECD_REDIS__URL; only demo and generate embed a Redis)",
}


class HelpFormatter(argparse.HelpFormatter):
    """Paragraphs kept (epilogs list exit codes line by line); plain flags show their default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(super(HelpFormatter, self)._fill_text(part, width, indent) if part.strip()
                         and not part.startswith("  ") else indent + part for part in text.split("\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "(default" in text or default in (None, False, [], "")
                or default is argparse.SUPPRESS or action.option_strings == []):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """A usage error is one line (with where to look), not the whole usage: exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _field(setting: str) -> Any:
    section, key = setting.split(".")
    section_type = Settings.model_fields[section].annotation
    return typing.cast(Any, section_type).model_fields[key]


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _argument_options(field: Any) -> dict[str, Any]:
    """argparse type/choices/action of a settings field, from its annotation."""
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is not None and args else annotation
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": base if base in (int, float) else str}


def add_setting_flag(parser: Any, spec: SettingFlag, help_text: str | None = None) -> None:
    """One settings flag: help and default from the field's docstring and default."""
    field = _field(spec.setting)
    dest = spec.dest or spec.flag.lstrip("-").replace("-", "_")
    description = (help_text or field.description or spec.setting).replace("%", "%%")
    parser.add_argument(spec.flag, dest=dest, default=None,
                        help=f"{description} [{spec.setting}; default: {_default_text(field.default)}]",
                        **_argument_options(field))
    section, key = spec.setting.split(".")
    FLAG_TO_SETTING[dest] = (section, key)
    _FLAG_OF[spec.setting] = spec.flag


def add_setting_flags(parser: argparse.ArgumentParser, *groups: str,
                      overrides: dict[str, str] | None = None) -> None:
    """The settings flags of ``groups`` (keys of SETTING_FLAGS), each group under its title."""
    for name in groups:
        group = parser.add_argument_group(GROUP_TITLES[name])
        if name == "common":
            group.add_argument("--config", type=Path, help="settings TOML file (default: ./settings.toml "
                               "when it exists; or SPECD_CONFIG)")
        if name == "target":
            group.add_argument("--pair", dest="model_pair", choices=list(MODEL_PAIRS), help="target and "
                               "draft in one: " + "; ".join(f"{k} = {t} + {d}" for k, (t, d) in
                                                            MODEL_PAIRS.items())
                               + " (--target-model/--draft-model still win)")
        for spec in SETTING_FLAGS[name]:
            add_setting_flag(group, spec, (overrides or {}).get(spec.setting))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
