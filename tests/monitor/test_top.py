from __future__ import annotations

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
