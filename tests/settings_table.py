"""The README's settings table, made from the settings themselves (test_readme checks
that the README holds exactly this)."""

from __future__ import annotations

from oai_audio_server.settings import GROUPS, env_name, setting_fields
from oai_audio_server.units import format_value


def settings_table() -> str:
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for group, title in GROUPS.items():
        rows.append(f"| **{title.split(':')[0]}** | | | |")
        for field in setting_fields():
            if field.metadata["group"] != group:
                continue
            flag = "`MODEL` (positional)" if field.name == "model" else (
                "`--" + field.name.replace("_", "-") + "`")
            default = field.default
            unit = field.metadata["unit"]
            shown = "none" if default in (None, ()) else format_value(default, unit)
            rows.append(f"| {flag} | `{env_name(field.name)}` | {shown} | "
                        f"{field.metadata['help'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
