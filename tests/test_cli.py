"""The ``dynamix`` CLI: help everywhere, flags map onto the typed configs, and a
generate -> segment run through the CLI on ``memory://``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dynamix_ray.cli import build_parser, main, segment_config
from dynamix_ray.config import SegmentConfig
from dynamix_ray.demo import DemoConfig
from dynamix_ray.inputs import InputError, check_table
from dynamix_ray.model.checkpoint import resolve_checkpoint

COMMANDS = [
    "generate",
    "segment",
    "train",
    "experiment",
    "report",
    "embed",
    "u2u",
    "histories",
    "serve",
    "demo",
]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: dynamix" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "dynamix_ray.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(c in out for c in COMMANDS)


def test_segment_flags_map_onto_the_config():
    args = build_parser().parse_args(
        [
            "segment",
            "in",
            "out",
            "--window",
            "30m",
            "--horizon-s",
            "5m",
            "--buffer-s",
            "0",
            "--min-events",
            "3",
            "--epsilon",
            "0.25",
        ]
    )
    cfg = segment_config(args)
    assert cfg == SegmentConfig(
        window_s=1800, horizon_s=300, buffer_s=0, min_events=3, epsilon=0.25
    )
    defaults = segment_config(build_parser().parse_args(["segment", "in", "out"]))
    assert defaults == SegmentConfig()


def test_epsilon_and_active_fraction_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "a", "b", "--epsilon", "0.1", "--active-fraction", "0.5"])
    assert "not allowed with" in capsys.readouterr().err


def test_active_traffic_is_a_third_way_to_choose_epsilon(capsys):
    from dynamix_ray.cli import build_parser, segment_config

    args = ["segment", "in", "out", "--active-traffic", "0.6667"]
    assert segment_config(build_parser().parse_args(args)).active_traffic == 0.6667
    with pytest.raises(SystemExit):
        main(["segment", "a", "b", "--epsilon", "0.1", "--active-traffic", "0.5"])
    assert "not allowed with" in capsys.readouterr().err


def test_generate_preset_is_a_base_that_flags_override():
    from dynamix_ray.cli import build_parser, generate_config
    from dynamix_ray.config import GenerateConfig

    def cfg(*flags: str) -> GenerateConfig:
        return generate_config(build_parser().parse_args(["generate", "o", *flags]))

    assert cfg() == GenerateConfig()
    paper = cfg("--preset", "paper")
    assert (paper.impressions_per_user_day, paper.active_share) == (120.0, 0.75)
    # a flag wins over the preset, even at the demo default's value
    mixed = cfg("--preset", "paper", "--events-per-user-day", "30")
    assert (mixed.impressions_per_user_day, mixed.active_share) == (30.0, 0.75)
    assert cfg("--passive-history-signal", "1").passive_history_signal == 1.0


def test_bad_input_is_a_clear_error_not_a_traceback(ray_session, capsys):
    import fsspec

    root = f"memory://nothing-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").mkdir(f"{root}/ad_impressions")
    code = main(["segment", root, "memory://o", "--no-progress"])
    assert code == 2
    assert "no Parquet files under 'ad_impressions/'" in capsys.readouterr().err
    assert main(["segment", f"{root}-not-there", "memory://o"]) == 2
    assert "not-there: no such folder" in capsys.readouterr().err


def test_generate_then_segment_through_the_cli(ray_session, capsys):
    events = f"memory://cli-{uuid.uuid4().hex[:8]}"
    out = f"memory://cli-out-{uuid.uuid4().hex[:8]}"
    assert (
        main(
            [
                "generate",
                events,
                "--users",
                "120",
                "--days",
                "2",
                "--ts-type",
                "timestamp",
            ]
        )
        == 0
    )
    assert main(["segment", events, out, "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads(printed[printed.index("{") :])
    assert meta["counts"]["users"] > 100
    assert meta["params"]["window"] == "6h"


def test_serve_config_file_and_flags_give_a_valid_app_config():
    """serve_configs/dynamix.yaml is the app's typed config; the flags build
    the same shape; a missing flag is an error naming it."""
    from dynamix_ray.cli import serve_app_config
    from dynamix_ray.serve.app import AppConfig, router_autoscaling, router_options

    args = build_parser().parse_args(
        ["serve", "--config", "serve_configs/dynamix.yaml"]
    )
    app_args, http = serve_app_config(args)
    cfg = AppConfig.model_validate(app_args)
    assert cfg.active.autoscaling_config and cfg.passive.autoscaling_config
    assert cfg.router.autoscaling_config["target_ongoing_requests"] == 32
    assert "autoscaling_config" in router_options(cfg)
    assert http == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 3.0}
    assert http["request_timeout_s"] == cfg.proxy_timeout_s  # the one rule
    flags = ["serve", "--segments", "s", "--histories", "h", "--active-checkpoint", "a"]
    app_args, _ = serve_app_config(
        build_parser().parse_args([*flags, "--autoscale", "3"])
    )
    cfg = AppConfig.model_validate(app_args)
    assert cfg.passive.checkpoint == "a"
    assert cfg.active.autoscaling_config["max_replicas"] == 3
    assert cfg.router.autoscaling_config == router_autoscaling(3)
    assert cfg.router.max_queued_requests == 32  # the default bounds are kept
    app_args, _ = serve_app_config(build_parser().parse_args(flags))
    assert "router" not in app_args  # a fixed app: one router, the default
    with pytest.raises(ValueError, match="--histories"):
        serve_app_config(build_parser().parse_args(["serve", "--segments", "s"]))


def test_serve_refuses_a_public_host_without_an_api_key(monkeypatch):
    from dynamix_ray.cli import serve_app_config

    flags = ["serve", "--segments", "s", "--histories", "h", "--active-checkpoint", "a"]
    with pytest.raises(ValueError, match="--api-key-env"):
        serve_app_config(build_parser().parse_args([*flags, "--host", "0.0.0.0"]))
    with pytest.raises(ValueError, match=r"\$DYNAMIX_KEY is not set"):
        serve_app_config(
            build_parser().parse_args([*flags, "--api-key-env", "DYNAMIX_KEY"])
        )
    monkeypatch.setenv("DYNAMIX_KEY", "k")
    app_args, http = serve_app_config(
        build_parser().parse_args(
            [*flags, "--host", "0.0.0.0", "--api-key-env", "DYNAMIX_KEY"]
        )
    )
    assert app_args["api_key_env"] == "DYNAMIX_KEY" and http["host"] == "0.0.0.0"
    _, http = serve_app_config(
        build_parser().parse_args(
            [*flags, "--host", "10.0.0.5", "--allow-unauthenticated"]
        )
    )
    for host in ("127.0.0.1", "localhost", "::1"):
        serve_app_config(build_parser().parse_args([*flags, "--host", host]))


def test_serve_checks_every_path_before_ray_starts(tmp_path, capsys):
    """Wrong paths fail in seconds, before any Ray or Serve, naming each path
    and what it should hold."""
    import ray

    was_up = ray.is_initialized()
    t0 = time.perf_counter()
    code = main(
        [
            "serve",
            "--segments",
            str(tmp_path / "no-segments"),
            "--histories",
            str(tmp_path / "no-histories"),
            "--active-checkpoint",
            str(tmp_path / "no-ckpt"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "no-segments: no published segments table" in err
    assert "run `dynamix segment`" in err and "no-histories" in err
    assert "active.checkpoint" in err and "passive.checkpoint" in err
    assert ray.is_initialized() == was_up  # nothing was started
    print(f"refused in {time.perf_counter() - t0:.2f} s")


def test_demo_runs_end_to_end_on_tiny_sizes(ray_session, tmp_path, capsys):
    """`make demo`'s path: generate, segment, train every arm, measure, serve
    real requests and a short load, stop, write the report; every output
    where the final lines say."""
    import re
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--users", "150", "--days", "3"]
    argv += ["--max-seq-len", "8", "--port", str(port), "--load-s", "3"]
    assert main([*argv, "--load-qps", "10"]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "NE" in text
    assert text.count("POST /rank user") == 5 and "HTTP 422" in text
    assert "POST /candidates user" in text and "R@200" in text
    assert "blend weights" in text and "most_popular_country" in text
    assert "candidates[0].media_type" in text
    exp = out / "experiment"
    for part in (
        "segments_run/segments/_CURRENT.json",
        "experiment/histories/histories/_CURRENT.json",
        "experiment/runs/boost-selective/seed0/metrics.json",
        "serving_timeline.json",
        "alure/u2u/_CURRENT.json",
        "alure/candidates/_CURRENT.json",
    ):
        assert (out / part).exists(), part
    results = json.loads((exp / "results.json").read_text())
    assert set(results["arms"]) == {
        "baseline",
        "remove-passive",
        "remove-active",
        "boost-all",
        "boost-selective",
    }  # boost-selective-only is left out of the demo (demo.DEMO_SKIPS)
    assert results["tables"]["removal"] == [
        "baseline",
        "remove-passive",
        "remove-active",
    ]
    for arm in results["arms"].values():
        assert arm["ne"]["values"][0] > 0 and arm["seeds"] == [0]
        assert arm["inference_qps_change_pct"]["mean"] is not None
    assert results["epsilon"]["calibrated"]["epsilon"] > 0
    timeline = json.loads((out / "serving_timeline.json").read_text())
    ok = timeline["requests"] - timeline["errors"]
    assert timeline["requests"] == 60 and ok == 60  # 10 QPS x 2 phases x 3 s
    assert all(row["Router"] == 1 for row in timeline["timeline"])
    compute = timeline["compute"]  # the replica processes were found and read
    assert compute["cpu_s"]["ActiveRanker"] > 0 and compute["cpu_s"]["Router"] > 0
    assert 0 < compute["phases"]["all"]["active_replica_share"] < 1
    report = re.search(r"report: (\S+index.html)", text).group(1)
    page = Path(report).read_text()
    for png in (
        "dwell",
        "corr_hours",
        "curves",
        "epsilon_sweep",
        "corr_dist",
        "recovery",
        "serving",
    ):
        assert f"src='{png}.png'" in page, png
        assert (exp / "report" / f"{png}.png").stat().st_size > 1000, png
    assert "Table 2 analog" in page and "Table 3 analog" in page
    assert "<h2>Retrieval</h2>" in page and "recall@1500" in page
    # `dynamix report` redraws it from results.json, the demo's timeline kept
    (exp / "report" / "serving.png").unlink()
    assert main(["report", str(exp)]) == 0
    assert (exp / "report" / "serving.png").exists()
    # relocatable: the moved tree still reports and its checkpoints resolve
    moved = tmp_path / "moved"
    out.rename(moved)
    (moved / "experiment" / "report" / "serving.png").unlink()
    assert main(["report", str(moved / "experiment")]) == 0
    assert (moved / "experiment" / "report" / "serving.png").exists()
    page = (moved / "experiment" / "report" / "index.html").read_text()
    assert "<h2>Retrieval</h2>" in page  # its u2u_eval.json moved along
    run = moved / "experiment" / "runs" / "baseline" / "seed0"
    assert resolve_checkpoint(str(run)).startswith(str(run))


def test_experiment_and_report_errors_name_what_is_wrong(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json does not exist" in capsys.readouterr().err
    argv = ["experiment", "removal", "e", "s", str(tmp_path), "--seeds", "0,x"]
    with pytest.raises(SystemExit):
        main(argv)
    assert (
        "argument --seeds: '0,x': expected comma-separated" in capsys.readouterr().err
    )
    assert main([*argv[:-1], "1,1"]) == 2
    assert "e: no such folder" in capsys.readouterr().err


def _all_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, p, action


def test_every_flag_has_help_and_its_help_shows_the_default():
    for name, p, action in _all_flags():
        flag = f"{name} {action.option_strings[-1]}"
        assert action.help, f"{flag} has no help text"
        shown = p.formatter_class(name)._get_help_string(action) or ""
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "%(default" in shown, f"{flag}: default not shown"
    demo = build_parser().parse_args(["demo"])
    assert demo.max_seq_len == DemoConfig().samples.max_seq_len
    assert demo.seeds == DemoConfig().seeds


def test_long_commands_take_no_progress_and_verbose_goes_anywhere():
    flags: dict[str, set[str]] = {}
    for name, _, action in _all_flags():
        flags.setdefault(name, set()).update(action.option_strings)
    for command in ("generate", "bucket", "segment", "train", "experiment", "embed"):
        assert "--no-progress" in flags[command], command
    for argv in (["-v", "segment", "a", "b"], ["segment", "a", "b", "-v"]):
        assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["segment", "a", "b"]).verbose is False


def test_input_mistakes_fail_before_ray_and_say_what_is_wrong(tiny_events, tmp_path):
    """No Ray is reachable at RAY_ADDRESS: a command that got as far as Ray
    would fail differently (or hang); these fail on their inputs first."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    cases = [
        ([str(tmp_path / "nope"), str(tmp_path), "o"], "no such folder"),
        (
            [f"{tiny_events}/ad_impressions", str(tmp_path), "o"],
            "this is the ad_impressions/ folder itself; pass the dataset root",
        ),
        ([tiny_events, tiny_events, "o"], "no published segments table in it"),
    ]
    for args, message in cases:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dynamix_ray.cli", "train", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr, done.stderr
        print(f"{message!r}: refused in {time.perf_counter() - t0:.1f} s")


def test_a_table_folder_or_its_parent_lead_to_the_same_table(tmp_path):
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "_CURRENT.json").write_text("{}")
    assert check_table(str(tmp_path), "segments") == str(tmp_path)
    assert check_table(str(tmp_path / "segments"), "segments") == str(tmp_path)
    with pytest.raises(InputError, match="no published u2u table"):
        check_table(str(tmp_path), "u2u")
