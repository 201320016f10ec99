"""States as Ray tasks on a local cluster: the spec's workflows, resources, context, human input, logs."""

from __future__ import annotations

import asyncio
import runpy
import statistics
from pathlib import Path

import pytest

pytest.importorskip("ray")

from agent import (
    Agent, Context, Isolation, ResourcePool, ResourceRequirements, ResourceType, StateFailedError,
)
from agent.errors import InvalidTransitionError, UnencodableValueError, UnknownNextStateError
from agent.human import QueueInputProvider
from agent.ray import cluster_pool
from tests.isolated.helpers import budget_race

from . import states
from .conftest import restart_cluster
from .helpers import failure_of

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> Agent:
    """An example's module-level agent, built with every state on Ray (``AGENT_ISOLATION``)."""
    monkeypatch.setenv("AGENT_ISOLATION", "ray")
    agent = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example_on_ray")["agent"]
    assert agent.isolation is Isolation.RAY
    return agent


class TestSpecExamples:
    """The spec's example workflows give the same results with every state on Ray."""

    async def test_quickstart(self, monkeypatch):
        agent = load_example("quickstart", monkeypatch)
        ctx = await agent.run()
        assert ctx.get_state("formatted") == "<<Hello, World!>>"
        assert "Result: Hello, World!" in agent.logs("format_output")

    async def test_text_processing(self, monkeypatch):
        ctx = await load_example("text_processing", monkeypatch).run()
        assert ctx.get_state("final_result")["analysis"] == {"length": 12, "words": 2, "has_punctuation": True}

    async def test_llm_pipeline_typed_data_and_joins(self, monkeypatch):
        agent = load_example("llm_pipeline", monkeypatch)
        ctx = await agent.run()
        assert ctx.get_state("generations") == 2
        assert ctx.get_state("final")["entities"] == ["France", "Paris"]
        assert agent.state_metadata["await_processing"].runs == 2

    async def test_data_analysis_parallel_chunks(self, monkeypatch):
        agent = load_example("data_analysis", monkeypatch)
        ctx = await agent.run()
        assert ctx.get_state("summary")["parallel"] is True
        assert agent.state_metadata["merge_results"].runs == 1

    async def test_ml_training_with_resources(self, monkeypatch):
        agent = load_example("ml_training", monkeypatch)
        agent.resource_pool = cluster_pool()
        ctx = await agent.run()
        assert ctx.get_state("evaluation") == {"epochs_run": 6, "accuracy": 0.9863}
        assert agent.state_metadata["train_model"].usage["ray_worker_pid"] > 0


class TestRayExample:
    """examples/ray_cluster.py runs on the cluster this process is connected to."""

    async def test_example(self, capsys):
        namespace = runpy.run_path(str(EXAMPLES / "ray_cluster.py"), run_name="ray_example")
        await namespace["main"]()
        out = capsys.readouterr().out
        readings = [float((i * 37) % 101) for i in range(40_000)]
        shards = [readings[i * 10_000:(i + 1) * 10_000] for i in range(4)]
        expected = {"mean": statistics.fmean(statistics.fmean(s) for s in shards), "max": 100.0}
        assert f"summary: {expected}" in out
        for i in range(4):
            assert f"shard {i}: 10000 readings on " in out
        agent = namespace["agent"]
        assert agent.state_metadata["merge"].runs == 1
        assert agent.resource_pool.totals[ResourceType.CPU] == 2


class TestResources:
    """Each state asks Ray for what its ResourceRequirements and ray_options declare."""

    async def test_fan_out_gets_its_resources_and_our_pool_decides(self, ray_cluster):
        pool = cluster_pool()
        assert pool.totals[ResourceType.CPU] == 2
        assert pool.totals[ResourceType.GPU] == 1
        agent = Agent("fan_out", isolation="ray", resource_pool=pool)
        agent.add_state("start", states.fan_out, isolation="inline")
        for i in range(4):
            agent.add_state(f"part_{i}", states.measure, resources=ResourceRequirements(cpu_units=1, memory_mb=64))
        agent.add_state("on_gpu", states.measure,
                        resources=ResourceRequirements(cpu_units=0.5, memory_mb=32, gpu_units=1))
        agent.add_state("on_disk", states.measure_on_disk,
                        resources=ResourceRequirements(cpu_units=0.25, memory_mb=0, resource_types=ResourceType.CPU))
        agent.add_state("merge", states.merge)
        ctx = await agent.run()
        for i in range(4):
            assert ctx.get_state(f"assigned_part_{i}") == {"CPU": 1.0, "memory": 64 * 2**20}
        assert ctx.get_state("assigned_on_gpu") == {"CPU": 0.5, "GPU": 1.0, "memory": 32 * 2**20}
        assert ctx.get_state("gpu_ids_on_gpu") == ["0"]
        assert ctx.get_state("assigned_on_disk") == {"CPU": 0.25, "disk": 1.0}
        assert len(ctx.get_state("merged")) == 6
        # Our admission held the fan-out to the cluster's 2 CPUs.
        assert pool.get_usage_stats()[ResourceType.CPU].peak_usage <= 2
        assert agent.state_metadata["merge"].runs == 1

    async def test_a_state_without_requirements_asks_for_one_cpu(self):
        agent = Agent("plain", isolation="ray")
        agent.add_state("m", states.measure, next_states=["merge"])
        agent.add_state("merge", states.merge)
        ctx = await agent.run(start="m")
        assert ctx.get_state("assigned_m") == {"CPU": 1.0}


class TestContext:
    """The snapshot goes in and the writes come out, in the project's value model."""

    async def test_writes_removals_and_values_cross(self):
        agent = Agent("ctx", isolation="ray")
        agent.add_state("greet", states.greet)
        agent.add_state("shout", states.shout)
        ctx = await agent.run(initial_context={"tuple": (1, {2, 3}), "scratch": b"x"})
        assert ctx.get_state("shouted").startswith("HELLO FROM ")
        assert ctx.get_state("seen_tuple") == (1, {2, 3})
        assert not ctx.has_state("scratch")

    async def test_a_big_value_rewritten_while_a_push_is_in_flight_crosses_once(self):
        # What had not been pushed when the state returned went back with its result, every
        # write of it: twelve writes of 10 MiB, over one frame's bound, failed the state.
        agent = Agent("rewrites", isolation="ray")
        agent.add_state("rewrite_a_big_value", states.rewrite_a_big_value)
        ctx = await agent.run()
        assert ctx.get_state("big") == bytes([11]) * (10 << 20)

    async def test_the_state_runs_in_a_task_of_its_own(self):
        agent = Agent("own_task", isolation="ray")
        agent.add_state("times_out_inside", states.times_out_inside)
        assert (await agent.run()).get_state("timed_out") is True

    async def test_typed_data_round_trip(self):
        agent = Agent("typed", isolation="ray")
        agent.add_state("typed", states.typed_step)
        ctx = await agent.run(initial_context={"progress": states.Progress(step=1, note="driver")})
        assert ctx.get_typed("progress", states.Progress) == states.Progress(step=2, note="driver, ray")

    async def test_an_unencodable_write_fails_the_state_in_the_worker(self):
        agent = Agent("unencodable", isolation="ray")
        agent.add_state("store_object", states.store_object)
        reason = (await failure_of(agent)).reason
        assert reason.kind == "exception"
        assert reason.exception_type == f"{UnencodableValueError.__module__}.UnencodableValueError"
        assert "context key 'handle'" in reason.message

    async def test_a_result_that_is_no_transition_is_refused_as_inline(self):
        # Even one that could not travel back: refused for what it is, as at every level.
        agent = Agent("bad_result", isolation="ray")
        agent.add_state("return_object", states.return_object, max_retries=2)
        with pytest.raises(InvalidTransitionError, match="'return_object' returned object <object object at"):
            await agent.run()
        assert agent.state_metadata["return_object"].attempts == 1

    async def test_a_name_no_state_can_have_is_an_unknown_state(self):
        # A lone surrogate cannot cross to the driver as it is; no state has it (add_state
        # refuses such names), so the run fails as inline: an unknown state, quoted.
        agent = Agent("bad_result", isolation="ray")
        agent.add_state("return_unencodable_name", states.return_unencodable_name)
        with pytest.raises(UnknownNextStateError, match=r"returned '\\\\ud800', which is not a state"):
            await agent.run()

    async def test_a_value_outside_the_model_is_refused_before_any_task(self):
        agent = Agent("refused", isolation="ray")
        agent.add_state("shout", states.shout)
        with pytest.raises(UnencodableValueError, match="local_only"):
            await agent.run(initial_context={"greeting": "hi", "tuple": 1, "local_only": object()})
        assert agent.state_metadata["shout"].attempts == 0

    async def test_each_attempt_gets_the_function_as_it_is_then(self, tmp_path):
        # A script's function travels by value, with the globals it reads. It was pickled
        # once per run: later attempts saw SETTINGS as it was at the first one.
        script = tmp_path / "settings_flow.py"
        script.write_text(
            "from agent import Agent\n"
            "SETTINGS = {'round': 0}\n"
            "async def bump(context):\n"
            "    SETTINGS['round'] += 1\n"
            "    return 'read' if SETTINGS['round'] <= 3 else None\n"
            "async def read(context):\n"
            "    context.set_state('seen', [*context.get_state('seen', []), SETTINGS['round']])\n"
            "    return 'bump'\n"
            "agent = Agent('globals', isolation='ray')\n"
            "agent.add_state('bump', bump, isolation='inline')\n"
            "agent.add_state('read', read)\n"
        )
        agent = runpy.run_path(str(script), run_name="settings_flow")["agent"]
        assert (await agent.run()).get_state("seen") == [1, 2, 3]

    async def test_writes_of_a_state_that_blocks_its_loop_are_kept_when_it_is_stopped(self):
        agent = Agent("blocking", isolation="ray")
        agent.add_state("blocks_after_writing", states.blocks_after_writing, timeout=3, max_retries=0)
        with pytest.raises(StateFailedError):
            await agent.run()
        assert agent.context.get_state("before_blocking") == 1 and agent.context.get_state("while_blocking") == 2

    async def test_a_value_spoiled_in_place_is_not_stored_and_the_next_task_runs(self):
        agent = Agent("spoiled")
        agent.add_state("spoil_in_place", states.spoil_in_place, isolation="inline")
        agent.add_state("shout", states.shout, isolation="ray")
        ctx = await agent.run(initial_context={"greeting": "hi", "tuple": 1, "items": [1]})
        assert ctx.get_state("shouted") == "HI"
        assert ctx.get_state("items") == [1]


class TestContextBudget:
    """Writes that fitted what each task could see, but not together: as for state processes."""

    async def test_concurrent_writers_cannot_pass_it_together(self):
        await budget_race("ray", states.two_writers, states.write_600kb, ("writer_1", "writer_2"))


class TestHumanInput:
    """context.human_in_the_loop inside a Ray task asks the driver's provider."""

    async def test_writes_arrive_while_the_state_waits_and_invalid_answers_are_asked_again(self):
        provider = QueueInputProvider()
        agent = Agent("approve", isolation="ray", human_input=provider)
        agent.add_state("write_then_ask", states.write_then_ask)
        run = asyncio.ensure_future(agent.run())
        first = await provider.wait_for_request()
        assert first.prompt == "Approve? (approve/reject)"
        assert first.state == "write_then_ask"
        # The state is blocked in its Ray task; its write is already here.
        assert agent.context.get_state("progress") == "asked"
        provider.answer(first.id, "maybe")
        second = await provider.wait_for_request()
        assert (second.id, second.attempt, second.rejected) == (first.id, 2, "'maybe' is not valid")  # as inline
        provider.answer(second.id, "approve")
        ctx = await run
        assert ctx.get_state("decision") == "approve"

    async def test_timeout_uses_the_default(self):
        agent = Agent("nobody", isolation="ray", human_input=QueueInputProvider())
        agent.add_state("ask_nobody", states.ask_nobody)
        ctx = await agent.run()
        assert ctx.get_state("fallback") == "fallback"


async def ask_and_approve(agent: Agent, provider: QueueInputProvider) -> Context:
    """Run ``agent``, whose state asks once, and approve: the run's error if it ends first."""
    run = asyncio.ensure_future(agent.run())
    asked = asyncio.ensure_future(provider.wait_for_request())
    done, _ = await asyncio.wait({run, asked}, return_when=asyncio.FIRST_COMPLETED)
    if asked not in done:
        asked.cancel()
        await run  # raises why the state failed
    provider.answer(asked.result().id, "approve")
    return await run


class TestReconnect:
    """A program that calls ray.shutdown() and ray.init() again keeps its Ray states working."""

    async def test_a_state_writes_and_asks_through_the_new_connection(self):
        # The relay actor ended with the first connection; the second needs one of its own.
        for connection in ("first", "second"):
            provider = QueueInputProvider()
            agent = Agent("approve", isolation="ray", human_input=provider)
            agent.add_state("write_then_ask", states.write_then_ask)
            ctx = await ask_and_approve(agent, provider)
            assert (ctx.get_state("progress"), ctx.get_state("decision")) == ("asked", "approve"), connection
            if connection == "first":
                restart_cluster()


    async def test_a_shutdown_under_a_running_state_fails_it(self, ray_cluster):
        # Ray never settles a task's ref once its connection is closed: the attempt waited
        # for good, or until a timeout that then blamed the state.
        agent = Agent("shut_under", isolation="ray")
        agent.add_state("sleep", states.sleep_forever, max_retries=0)
        run = asyncio.ensure_future(agent.run())
        try:
            # Its task runs once its first write came back through the relay. (STATE_STARTED
            # came sooner: a shutdown before the task was sent left the executor to connect
            # again, and the state then slept for good on the new cluster.)
            for _ in range(3000):
                if agent.context.get_state("sleeper_pid") is not None or run.done():
                    break
                await asyncio.sleep(0.01)
            assert agent.context.get_state("sleeper_pid") is not None, "the state's task never ran"
            await asyncio.to_thread(ray_cluster.shutdown)
            with pytest.raises(StateFailedError) as failed:
                await asyncio.wait_for(run, 60)
        finally:
            restart_cluster()
        assert failed.value.reason.kind == "lost_connection"
        assert "ray.shutdown()" in failed.value.reason.message


class TestLogs:
    """A Ray attempt's stdout and stderr are kept per attempt and read with agent.logs()."""

    async def test_output_of_each_attempt(self, monkeypatch, capsys):
        monkeypatch.setenv("AGENT_ECHO", "stdout")
        monkeypatch.setattr("agent.supervisor.output._configured", False)
        agent = Agent("logs", isolation="ray")
        agent.add_state("greet", states.greet)
        agent.add_state("shout", states.shout)
        await agent.run(initial_context={"tuple": 1, "scratch": 1})
        text = agent.logs("greet")
        assert "hello from a Ray worker\n" in text
        assert "a warning on stderr\n" in text
        assert "written to fd 1 directly\n" in text
        assert agent.logs("shout") == ""
        # Echoed as isolated states' output is, each line after the state's name.
        assert "greet | hello from a Ray worker" in capsys.readouterr().out


    async def test_a_state_that_runs_again_keeps_each_laps_output(self):
        # Each lap is attempt 1 again: its file was rewritten (and a lap that printed nothing
        # hid what came before), where an isolated state's output is appended.
        agent = Agent("laps", isolation="ray")
        agent.add_state("lap", states.lap)
        await agent.run()
        assert agent.logs("lap") == "lap 1\nlap 3\n"


class TestLeftovers:
    async def test_what_an_attempt_started_ends_with_it(self):
        # It outlived its state in the reused worker (a process state's goes with its cgroup),
        # and wrote into the next attempt's output.
        import psutil

        agent = Agent("leaves", isolation="ray")
        agent.add_state("leave", states.leave_a_child)
        ctx = await agent.run()
        try:
            child = psutil.Process(ctx.get_state("child"))
        except psutil.NoSuchProcess:
            return  # gone already
        grandchildren = child.children()
        gone, alive = psutil.wait_procs([child, *grandchildren], timeout=10)
        assert not alive or all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


class TestMixed:
    """Ray states and inline/process states share one run and one context."""

    async def test_ray_state_between_inline_and_process_states(self):
        agent = Agent("mixed", isolation="inline", resource_pool=ResourcePool(total_cpu=2, total_gpu=1))
        agent.add_state("greet", states.greet, isolation="ray")
        agent.add_state("shout", states.shout, isolation="process")
        ctx = await agent.run(initial_context={"tuple": 1, "scratch": 1})
        assert ctx.get_state("shouted").startswith("HELLO")
        # One agent.logs() for both: the Ray attempt's output, and the process attempt's log.
        assert "hello from a Ray worker" in agent.logs("greet")
        assert agent.logs("shout") == ""
