from __future__ import annotations

import pytest

from agent import events as ev
from agent.monitor.top import TopView, main, render_text, sparkline

from .conftest import Feed


class TestSparkline:
    """Bars scale to the maximum of the shown values."""

    def test_scaling(self):
        assert sparkline([0, 1, 2, 4]) == "▁▃▅█"
        assert sparkline([0, 0]) == "▁▁"
        assert sparkline([]) == ""
        assert len(sparkline(range(100), width=10)) == 10


class TestTopView:
    """The frame lists active runs, running states and finished runs."""

    def test_frame(self, clock, collector, process):
        etl = Feed(clock, collector, agent="etl_pipeline", run="aaaaaaaa-1")
        train = Feed(clock, collector, agent="model_training", run="bbbbbbbb-2")
        etl.emit(ev.RUN_STARTED)
        train.emit(ev.RUN_STARTED)
        etl.state("extract", 0.5)
        etl.emit(ev.STATE_STARTED, "transform_0", attempt=1)
        train.failure("fetch_weights", 0.2, attempt=1, final=False)
        train.emit(ev.STATE_RETRYING, "fetch_weights", attempt=1, data={"delay": 0.0})
        train.emit(ev.STATE_STARTED, "fetch_weights", attempt=2)
        done = Feed(clock, collector, agent="batch_inference", run="cccccccc-3")
        done.emit(ev.RUN_STARTED)
        done.state("split", 0.3)
        done.emit(ev.RUN_FINISHED, status="completed")
        clock.advance(1.0)
        collector.sample()
        view = TopView(collector)
        view.update()
        text = render_text(view, width=110)
        assert "runs 2 active" in text and "states 2 running" in text
        assert "completed 2" in text and "failed attempts 1" in text
        for word in ("etl_pipeline", "model_training", "transform_0", "fetch_weights", "batch_inference",
                     "aaaaaaaa", "finished", "completed"):
            assert word in text
        states_part = text.split("running states", 1)[1]
        row = next(line.split() for line in states_part.splitlines() if "fetch_weights" in line)
        assert row[:5] == ["model_training", "fetch_weights", "2", "1.3", "s"]  # second attempt, running 1.3 s

    def test_names_are_text_not_markup(self, clock, collector):
        # "[/b]" read as rich markup raises MarkupError; a newline would split the row.
        feed = Feed(clock, collector, agent="a[/b]\nFAKE[red]", run="dddddddd-4")
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_STARTED, "st\x1b[2Jate", attempt=1)
        view = TopView(collector)
        view.update()
        text = render_text(view, width=110)
        assert "a[/b]\\nFAKE[red]" in text and "st\\x1b[2Jate" in text
        assert "\x1b" not in text and not any(line.lstrip().startswith("FAKE") for line in text.splitlines())

    def test_empty(self, collector):
        view = TopView(collector)
        view.update()
        text = render_text(view)
        assert "no runs in progress" in text
        assert "running states" not in text


class TestMain:
    """``agent top`` prints a frame of what it finds, or runs the demo and prints its busiest frame."""

    def test_nothing_to_watch(self, capsys):
        assert main(["--once"]) == 0
        assert "no runs in any process of this user right now" in capsys.readouterr().out

    def test_bad_option(self, capsys):
        assert main(["--interval", "0"]) == 2

    def test_demo_has_no_json(self, capsys):
        # A drawn frame where JSON was asked for would break whatever reads it.
        assert main(["--demo", "--json"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "give one of them" in captured.err

    def test_demo_snapshot(self, capsys):
        assert main(["--demo", "--snapshot", "--speed", "40", "--interval", "0.01", "--width", "100"]) == 0
        out = capsys.readouterr().out
        assert "agent top · demo" in out
        assert "model_training" in out and "batch_inference" in out

    @pytest.mark.parametrize("isolation", ["process", "worker"])
    def test_demo_snapshot_of_isolated_states(self, capsys, isolation):
        # Its flaky state counted its failures in the demo's memory, which a state's
        # process does not share: every attempt failed, and so did the demo.
        assert main(["--demo", "--snapshot", "--speed", "40", "--interval", "0.01", "--width", "100",
                     "--demo-isolation", isolation]) == 0
        assert "agent top · demo" in capsys.readouterr().out

    def test_through_the_agent_command(self, capsys):
        from agent.cli import main as agent_main

        assert agent_main(["top", "--demo", "--snapshot", "--speed", "40", "--interval", "0.01"]) == 0
        out = capsys.readouterr().out
        assert "agent top · demo" in out
        # Which demo runs are still live in the busiest frame depends on timing; some are.
        assert any(name in out for name in ("etl_pipeline", "model_training", "batch_inference"))


class TestOptionalDependencies:
    """Without rich or prometheus_client the user is told what to install."""

    def run_without(self, module: str, code: str):
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        prelude = f"import sys; sys.modules[{module!r}] = None\n"
        return subprocess.run([sys.executable, "-c", prelude + code], cwd=root, capture_output=True, text=True,
                              timeout=60)

    def test_top_without_rich(self):
        done = self.run_without("rich", "from agent.monitor.top import main; raise SystemExit(main(['--demo']))")
        assert done.returncode == 2
        assert "pip install 'agent-isolation[monitor]'" in done.stderr

    def test_exporter_without_prometheus_client(self):
        done = self.run_without(
            "prometheus_client",
            "from agent.errors import MonitorError\n"
            "try:\n    from agent_monitor import start_prometheus_exporter\n"
            "except MonitorError as e:\n    print(e)\n",
        )
        assert done.returncode == 0, done.stderr
        assert "agent-isolation[monitor]" in done.stdout


class TestHostileNames:
    """Names and messages from other processes are shown escaped: no fake rows, no escape sequences."""

    EVIL = "evil\nFAKE 1 run\x1b[2J\x1b[31m"

    def view(self) -> dict:
        run = {
            "run_id": "run\n0001-aaaa", "agent": self.EVIL, "status": "running", "started": 1.0, "elapsed": 2.0,
            "states": {"completed": 1, "total": 3, "running": 1, "waiting": 0, "failed": 1},
            "running": [{"state": "st\nate\x1b[0m", "attempt": 1, "for": 1.5, "isolation": "inline"}],
            "human_input": [{"state": "ask\r", "prompt": "sure?\x1b[8m", "default": None}],
            "failed": [{"state": "bad\u202e", "status": "failed", "error": "boom\x07 \x1b]0;title\x07"}],
        }
        return {"time": 0.0, "processes": [{"pid": 4242, "command": "python", "runs": [run], "error": "gone\x1b[K"}],
                "saved": [{"run_id": "r2", "agent": "saved\x1b[1m", "status": "completed", "state": "completed",
                           "updated": 0.0, "store": "/tmp/s\ntore.db"}]}

    def test_render_box_escapes_control_characters(self):
        from agent.monitor.top import render_box

        text = render_box(self.view(), width=200)
        assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\u202e" not in text
        assert not any(line.lstrip().startswith(("FAKE", "ate", "0001", "tore")) for line in text.splitlines())
        row = next(line for line in text.splitlines() if line.lstrip().startswith("4242"))
        assert "evil\\nFAKE 1 run\\x1b[2J\\x1b[31m" in row and "st\\nate\\x1b[0m" in row
        assert "bad\\u202e failed: boom\\x07" in text

    def test_color_still_paints_the_escaped_row(self):
        from agent.monitor.top import render_box

        text = render_box(self.view(), width=200, color=True)
        row = next(line for line in text.splitlines() if "4242" in line and "running" in line)
        assert row.startswith("\x1b[36m") and row.endswith("\x1b[0m")
        assert row.count("\x1b") == 2  # the paint only

    def test_wide_characters_keep_columns_aligned(self):
        from agent.monitor.top import render_box

        view = self.view()
        runs = view["processes"][0]["runs"]
        runs.append({**runs[0], "run_id": "bbbbbbbb", "agent": "plain"})
        runs[0]["agent"] = "数据管道"  # four characters, eight terminal columns
        lines = render_box(view, width=200).splitlines()
        wide = next(line for line in lines if "数据管道" in line)
        plain = next(line for line in lines if "plain" in line)
        # where the RUN column starts on screen: each of the four wide characters takes two columns
        assert wide.index("run\\n0001") + 4 == plain.index("bbbbbbbb")
