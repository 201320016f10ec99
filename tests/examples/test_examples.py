"""Every example workflow runs and produces its documented outcome."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from agent import Agent, AgentStatus, StateStatus

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> Agent:
    namespace = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example_under_test")
    return namespace["agent"]


class TestLearnByExample:
    """The spec's Learn-by-Example workflows."""

    async def test_quickstart(self):
        agent = load("quickstart")
        ctx = await agent.run()
        assert ctx.get_state("formatted") == "<<Hello, World!>>"
        assert agent.status is AgentStatus.COMPLETED

    async def test_text_processing(self):
        agent = load("text_processing")
        ctx = await agent.run()
        result = ctx.get_state("final_result")
        assert result["text"] == "Hello World!"
        assert result["analysis"] == {"length": 12, "words": 2, "has_punctuation": True}

    async def test_llm_pipeline_regenerates_then_joins_once(self):
        agent = load("llm_pipeline")
        ctx = await agent.run()
        assert ctx.get_state("generations") == 2  # the weak first draft was regenerated
        assert ctx.get_state("final")["entities"] == ["France", "Paris"]
        assert agent.state_metadata["await_processing"].runs == 2  # once per draft, after both branches
        assert ctx.get_state("regenerated") == 1

    async def test_data_processing(self):
        agent = load("data_processing")
        ctx = await agent.run()
        assert ctx.get_state("validation_passed") is True
        assert ctx.get_state("output") == [{"id": 1, "value": "TEST"}, {"id": 2, "value": "MORE"}]
        assert agent.state_metadata["handle_error"].status is StateStatus.PENDING

    async def test_data_processing_invalid_records(self):
        agent = load("data_processing")
        ctx = await agent.run(initial_context={"records": [{"id": "x"}]})
        assert ctx.get_state("validation_passed") is False
        assert agent.state_metadata["handle_error"].status is StateStatus.COMPLETED
        assert ctx.get_state("output") is None

    async def test_ml_training_stops_early(self):
        agent = load("ml_training")
        ctx = await agent.run()
        assert ctx.get_state("evaluation") == {"epochs_run": 6, "accuracy": 0.9863}


class TestRealWorld:
    """The spec's More-Real-World-Use-Cases workflows."""

    async def test_content_management(self):
        agent = load("content_management")
        ctx = await agent.run()
        published = ctx.get_state("published")
        assert published["images"] == ["cover-agents-on-one-box.png"]
        assert "The scheduler" in ctx.get_state("article").body
        assert agent.state_metadata["await_completion"].runs == 1
        assert agent.state_metadata["publish"].runs == 1

    async def test_data_analysis_parallel(self):
        agent = load("data_analysis")
        ctx = await agent.run()
        summary = ctx.get_state("summary")
        assert summary["parallel"] is True
        assert summary["count"] == 20_000
        assert summary["sum"] == sum(float(i % 97) for i in range(20_000))
        assert agent.state_metadata["merge_results"].runs == 1

    async def test_data_analysis_small_dataset(self):
        module = runpy.run_path(str(EXAMPLES / "data_analysis.py"), run_name="example_small")
        small = module["agent"]
        ctx = await small.run(initial_context={"dataset": module["Dataset"](name="tiny", data=[1.0, 2.0, 3.0])})
        assert ctx.get_state("summary")["parallel"] is False
        assert ctx.get_state("summary")["mean"] == 2.0

    @pytest.mark.parametrize("priority,tags,expected", [
        ("low", ["bug"], "Engineering is reproducing T-2."),
        ("low", [], "Thanks for reaching out; we will reply within a day."),
    ])
    async def test_customer_service_routing(self, priority, tags, expected):
        module = runpy.run_path(str(EXAMPLES / "customer_service.py"), run_name="example_cs")
        agent = module["agent"]
        ticket = module["ServiceTicket"](ticket_id="T-2", priority=priority, subject="s", tags=tags)
        ctx = await agent.run(initial_context={"ticket": ticket})
        assert ctx.get_state("sent") == expected
        assert agent.state_metadata["human_review"].status is StateStatus.PENDING


class TestHumanReview:
    """The customer-service review step is answered from code, as a web app would."""

    @pytest.mark.parametrize("answers,review,sent", [
        (["approve"], "approve", "We are on it: an engineer will call you within 15 minutes."),
        (["maybe", "reject"], "reject", "Thanks for reaching out; we will reply within a day."),
    ])
    async def test_review_answered_through_the_queue(self, answers, review, sent):
        import asyncio

        from agent.human import QueueInputProvider

        module = runpy.run_path(str(EXAMPLES / "customer_service.py"), run_name="example_cs_review")
        agent = module["agent"]
        provider = QueueInputProvider()
        agent.human_input = provider

        async def reviewer():
            for answer in answers:
                request = await provider.wait_for_request()
                assert "Send this reply?" in request.prompt and request.state == "human_review"
                provider.answer(request.id, answer)

        ctx, _ = await asyncio.gather(agent.run(), reviewer())
        assert ctx.get_state("review") == review
        assert ctx.get_state("sent") == sent

    async def test_review_times_out_to_the_default(self):
        from agent.human import QueueInputProvider

        module = runpy.run_path(str(EXAMPLES / "customer_service.py"), run_name="example_cs_default")
        agent = module["agent"]
        agent.human_input = QueueInputProvider()
        ctx = await agent.run(initial_context={"review_timeout": 0.01})
        assert ctx.get_state("review") == "approve"


class TestPreemptionExample:
    """The README's priorities-and-preemption walkthrough does what it prints."""

    async def test_urgent_job_evicts_and_batch_jobs_resume(self):
        module = runpy.run_path(str(EXAMPLES / "priorities_preemption.py"), run_name="example_preempt")
        agent = module["agent"]
        ctx = await agent.run(timeout=60)
        timeline = module["timeline"]
        kinds = [line.split()[1:] for line in timeline]
        assert kinds.index(["started", "urgent_inference"]) > kinds.index(["preempted", "embed_shard_a"])
        assert kinds.index(["started", "urgent_inference"]) > kinds.index(["preempted", "embed_shard_b"])
        assert kinds.index(["completed", "urgent_inference"]) < kinds.index(["completed", "embed_shard_a"])
        for shard, key in (("embed_shard_a", "rows_a"), ("embed_shard_b", "rows_b")):
            meta = agent.state_metadata[shard]
            assert meta.preemptions == 1 and meta.attempts == 1
            assert ctx.get_state(key) == module["ROWS"]
            assert ctx.get_state(key + "_resumed_at") >= 10  # continued from its own progress
        assert ctx.get_state("answer") == 42
