"""docs/configuration.md is generated from the settings model and must not drift from it."""

from __future__ import annotations

from pathlib import Path

from bucketsync import configdoc
from bucketsync.config import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_md_matches_the_settings_model() -> None:
    assert DOC.read_text() == configdoc.render(), (
        "docs/configuration.md drifted from src/bucketsync/config.py: "
        "run `python -m bucketsync.configdoc > docs/configuration.md`"
    )


def test_every_option_is_documented_with_type_default_env_var_and_description() -> None:
    text = DOC.read_text()
    for *_, model, _ in configdoc.SECTIONS:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description="
            assert f"| `{name}` |" in text
    for name, info in Settings.model_fields.items():
        assert info.description and f"`[{name}]`" in text
    assert "`BUCKETSYNC_AGENT__LISTEN`" in text and "`BUCKETSYNC_DATASETS__NAME__INTERVAL`" in text
    assert "| `interval` | duration | `1m` |" in text
    assert "| `api_token_file` | path (secret file) | unset |" in text
    assert "| `sync` | `poll` \\| `events` \\| `manual` | `poll` |" in text
    assert "| `reconcile_interval` | duration | `1h` |" in text
    assert "| `driver` | string | required |" in text


def test_the_generator_refuses_a_field_without_description(monkeypatch: object) -> None:
    import pytest

    from bucketsync.config import DriverConfig

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(DriverConfig.model_fields["region"], "description", None)
        assert configdoc.main() == 1
    finally:
        mp.undo()
