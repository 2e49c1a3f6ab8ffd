from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.test import taddons

from addons.config import STATS, Config
from addons.metrics import REGISTRY


class Limits:
    """Stands in for an addon whose options a profile drives; refuses a URL limit of 1."""

    def load(self, loader: Any) -> None:
        loader.add_option("limits_max_url_length", int, 8192, "")
        loader.add_option("egress_connect_ports", Sequence[str], ["443"], "")

    def configure(self, updated: set[str]) -> None:
        if "limits_max_url_length" in updated and ctx.options.limits_max_url_length == 1:
            raise exceptions.OptionsError("limits_max_url_length: 1 is too small")


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return str(p)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WAYPOST_PROFILE", "PROXY_PORT", "LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)


def test_profile_becomes_options(tmp_path: Path) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        path = write(
            tmp_path,
            "limits: {max_url_length: 100}\nsecurity: {egress: {connect_ports: [443, 8443]}}\n",
        )
        tctx.configure(cfg, waypost_profile=path)
        assert ctx.options.limits_max_url_length == 100
        assert list(ctx.options.egress_connect_ports) == ["443", "8443"]
        assert cfg.loaded and cfg.reload_error is None


def test_command_line_beats_environment_beats_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        tctx.options.update(limits_max_url_length=50)  # as if --set on the command line
        monkeypatch.setenv("PROXY_PORT", "3128")
        tctx.configure(
            cfg,
            waypost_profile=write(
                tmp_path, "server: {port: 9999}\nlimits: {max_url_length: 100}\n"
            ),
        )
        assert ctx.options.limits_max_url_length == 50
        assert ctx.options.listen_port == 3128


def test_environment_names_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        monkeypatch.setenv("WAYPOST_PROFILE", write(tmp_path, "limits: {max_url_length: 77}\n"))
        tctx.configure(cfg, waypost_profile="")
        assert ctx.options.limits_max_url_length == 77


def test_bad_profile_refused_at_startup(tmp_path: Path) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"p\.yaml:2: limits\.max_url_length"):
            tctx.configure(
                cfg, waypost_profile=write(tmp_path, "server: {}\nlimits: {max_url_length: -3}\n")
            )
        assert ctx.options.waypost_profile == ""  # rolled back to the config in force


def test_option_refused_by_an_addon_points_at_the_profile_line(tmp_path: Path) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        with pytest.raises(
            exceptions.OptionsError, match=r"p\.yaml:3: limits\.max_url_length: .*too small"
        ):
            tctx.configure(
                cfg, waypost_profile=write(tmp_path, "server: {}\nlimits:\n  max_url_length: 1\n")
            )


def test_unknown_mitmproxy_option(tmp_path: Path) -> None:
    cfg = Config()
    with taddons.context(cfg) as tctx:
        with pytest.raises(
            exceptions.OptionsError, match=r"p\.yaml:2: mitmproxy\.nope: not a mitmproxy option"
        ):
            tctx.configure(cfg, waypost_profile=write(tmp_path, "mitmproxy:\n  nope: 1\n"))


def test_reload_swaps_or_keeps_the_old_config(tmp_path: Path) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        path = write(tmp_path, "limits: {max_url_length: 100}\n")
        tctx.configure(cfg, waypost_profile=path)

        Path(path).write_text("limits: {max_url_length: 200}\n")
        assert cfg.reload()[0]
        assert ctx.options.limits_max_url_length == 200

        Path(path).write_text("limits: {max_url_length: nope}\n")
        ok, why = cfg.reload()
        assert not ok and "max_url_length" in why
        assert ctx.options.limits_max_url_length == 200
        assert cfg.reload_error == why

        # valid YAML, refused by an addon: mitmproxy rolls every option back
        Path(path).write_text("server: {port: 1234}\nlimits: {max_url_length: 1}\n")
        ok, why = cfg.reload()
        assert not ok and "too small" in why
        assert ctx.options.limits_max_url_length == 200
        assert ctx.options.listen_port == 8080

        Path(path).write_text("limits: {max_url_length: 300}\n")
        assert cfg.reload()[0] and cfg.reload_error is None
        assert ctx.options.limits_max_url_length == 300


def test_reload_respects_later_manual_changes(tmp_path: Path) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        path = write(tmp_path, "limits: {max_url_length: 100}\n")
        tctx.configure(cfg, waypost_profile=path)
        tctx.options.update(limits_max_url_length=42)  # an operator's edit in mitmweb
        Path(path).write_text("limits: {max_url_length: 200}\n")
        assert cfg.reload()[0]
        assert ctx.options.limits_max_url_length == 42


def test_no_addon_attribute_shadows_a_hook(tmp_path: Path) -> None:
    """mitmproxy calls every attribute named like a hook: a refused reload once left its reason
    in Config.error, and every failed flow then logged "Addon handler error ... not callable"."""
    from mitmproxy import hooks

    from addons import bundle

    cfg = Config()
    with taddons.context(cfg) as tctx:
        path = write(tmp_path, "server: {port: 8081}\n")
        tctx.configure(cfg, waypost_profile=path)
        Path(path).write_text("server: {port: nope}\n")
        assert not cfg.reload()[0]
    for addon in [cfg, *bundle.addons]:
        assert set(vars(addon)) & set(hooks.all_hooks) == set(), type(addon).__name__


def test_reload_metrics_count_outcomes(tmp_path: Path) -> None:
    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    before = {r: sample("config_reloads_total", result=r) or 0.0 for r in ("success", "failure")}
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        path = write(tmp_path, "limits: {max_url_length: 100}\n")
        tctx.configure(cfg, waypost_profile=path)
        assert sample("config_last_reload_successful") == 1
        applied_at = sample("config_last_reload_success_timestamp_seconds")
        assert applied_at and applied_at == STATS.last_success

        Path(path).write_text("limits: {max_url_length: nope}\n")
        assert not cfg.reload()[0]
        assert sample("config_last_reload_successful") == 0
        assert sample("config_reloads_total", result="failure") == before["failure"] + 1
        assert sample("config_last_reload_success_timestamp_seconds") == applied_at

        Path(path).write_text("limits: {max_url_length: 200}\n")
        assert cfg.reload()[0]
        assert sample("config_last_reload_successful") == 1
        assert sample("config_reloads_total", result="success") == before["success"] + 1
        assert sample("config_reloads_total", result="failure") == before["failure"] + 1


class Modes:
    """An addon with a choice option, declared through the kernel's option table."""

    def load(self, loader: Any) -> None:
        from addons.kernel.options import Option, declare

        declare(loader, [Option("filter_mode", str, "enforce", "", ["enforce", "shadow"])])


def test_unknown_options_that_look_like_waypost_ones_are_named() -> None:
    from addons.config import unknown_options

    with taddons.context(Config(), Modes()) as tctx:
        tctx.options.deferred.update(
            {"filter_mdoe": "x", "cache_anything": "x", "other_script_option": "x", "acl_mode": "x"}
        )
        assert unknown_options(tctx.options) == [
            "--set acl_mode: the addon that declares it is not loaded",
            "--set cache_anything: not an option of any loaded addon",
            "--set filter_mdoe: not an option of any loaded addon (did you mean filter_mode?)",
        ]


def test_a_deferred_value_outside_the_choices_is_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with taddons.context() as tctx:
        tctx.options.set("filter_mode=shadwo", defer=True)
        with caplog.at_level("ERROR", logger="waypost.options"):
            tctx.master.addons.add(Modes())
        assert "--set filter_mode: 'shadwo' is not one of 'enforce', 'shadow'" in caplog.text
        assert tctx.options.filter_mode == "enforce"
        assert "filter_mode" not in tctx.options.deferred
        tctx.options.set("filter_mode=shadow")
        assert tctx.options.filter_mode == "shadow"
        with pytest.raises(exceptions.OptionsError, match="not one of 'enforce', 'shadow'"):
            tctx.options.update(filter_mode="bogus")
        assert tctx.options.filter_mode == "shadow"


def test_reload_command(tmp_path: Path) -> None:
    cfg, lim = Config(), Limits()
    with taddons.context(cfg, lim) as tctx:
        path = write(tmp_path, "limits: {max_url_length: 100}\n")
        tctx.configure(cfg, waypost_profile=path)
        Path(path).write_text("limits: {max_url_length: 200}\n")
        assert "reloaded" in tctx.master.commands.execute("waypost.reload")
        assert ctx.options.limits_max_url_length == 200
        Path(path).write_text("limits: {max_url_length: nope}\n")
        with pytest.raises(exceptions.CommandError, match="max_url_length"):
            tctx.master.commands.call("waypost.reload")
        assert ctx.options.limits_max_url_length == 200


class Secrets:
    def load(self, loader: Any) -> None:
        loader.add_option("admin_token", str, "", "")
        loader.add_option("cli_token", str, "", "")


def test_secrets_are_hidden_from_mitmwebs_options() -> None:
    from mitmproxy import optmanager

    cfg = Config()
    with taddons.context(cfg, Secrets()) as tctx:
        tctx.options.update(admin_token="s3cret")
        # What mitmweb's GET /options and its option updates send.
        dumped = optmanager.dump_dicts(tctx.options)
        assert dumped["admin_token"]["value"] == "********"
        assert dumped["cli_token"]["value"] == ""  # unset stays visibly unset
        assert optmanager.dump_dicts(tctx.options, ["admin_token"])["admin_token"]["value"] != (
            "s3cret"
        )
        assert tctx.options.admin_token == "s3cret"  # the option itself is untouched
        tctx.options.set("admin_token=other")  # --set still works
        assert tctx.options.admin_token == "other"
        cfg.done()
        assert optmanager.dump_dicts(tctx.options)["admin_token"]["value"] == "other"
