"""Steering jobs through agentctl: respond to a question, pause and resume, cancel, runner slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import Agentd, User, processes_of, running_as, wait_until, write_workflow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

REVIEW = '''
from agent import Agent

agent = Agent("review")

async def review(context):
    answer = await context.human_in_the_loop("Deploy to production?", timeout=300,
                                             validator=lambda text: text in ("yes", "no"))
    print("answer", answer)
    context.set_state("answer", answer)
    return None

agent.add_state("review", review)
'''

HUGE_QUESTIONS = '''
from agent import Agent

from agent.human import MAX_TEXT

agent = Agent("huge", isolation="inline")
NAMES = [f"q{i}" for i in range(90)]

async def start(context):
    return NAMES

async def ask(context):
    await context.human_in_the_loop("Deploy? " + "x" * (MAX_TEXT - 8), timeout=300)

agent.add_state("start", start)
for name in NAMES:
    agent.add_state(name, ask)
'''

LOUD = '''
from agent import Agent

agent = Agent("loud")

async def inline_out(context):  # about 1.5 MB each: more than one reply of agentd carries
    for i in range(30_000):
        print(f"inline {i:06d} " + "x" * 40)
    print("INLINE-END", flush=True)
    return "loud"

async def loud(context):
    for i in range(30_000):
        print(f"process {i:06d} " + "y" * 40)
    print("PROCESS-END", flush=True)

agent.add_state("inline_out", inline_out, isolation="inline")
agent.add_state("loud", loud, isolation="process")
'''

STEPS = '''
import asyncio, os
from agent import Agent

agent = Agent("steps")

async def first(context):
    with open(context.get_state("out"), "a") as f:
        f.write("first\\n")
    return "second"

async def second(context):
    with open(context.get_state("out"), "a") as f:
        f.write("second\\n")
    while not os.path.exists(context.get_state("release")):
        await asyncio.sleep(0.05)
    return None

agent.add_state("first", first)
agent.add_state("second", second)
'''


TALKER = '''
import asyncio, os
from agent import Agent

agent = Agent("talker")

async def talk(context):
    print("hello", flush=True)
    while not os.path.exists(context.get_state("release")):
        await asyncio.sleep(0.05)
    print("goodbye", flush=True)
    return None

agent.add_state("talk", talk)
'''


BOOM = """\
from agent import Agent
agent = Agent("boom")

def helper():
    raise ValueError("from the job")

async def s(context):
    helper()

agent.add_state("s", s)
"""


class TestHumanInTheLoop:
    """A state's question shows in agentctl status; agentctl respond answers it (re-asked when invalid)."""

    def test_respond_answers_the_question(self, agentd: Agentd, users: tuple[User, User], workdir: Path) -> None:
        ann, _ = users
        agentd.start()
        job = agentd.submit(write_workflow(workdir, "review.py", REVIEW), user=ann)
        first = wait_until(lambda: agentd.status(job, user=ann)["pending"], "the question to be asked")
        [question] = first
        assert question["prompt"] == "Deploy to production?" and question["state"] == "review"
        assert "Deploy to production?" in agentd.ctl("status", job, user=ann).stdout

        done = agentd.ctl("respond", job, "not-a-question", "yes", user=ann)
        assert done.returncode == 5 and "no open question" in done.stderr
        assert agentd.ctl("respond", job, question["id"], "maybe", user=ann).returncode == 0

        def reasked() -> dict | None:  # the same question again (inline: same id, attempt 2)
            pending = agentd.status(job, user=ann)["pending"]
            fresh = [q for q in pending if q["id"] != question["id"] or q["attempt"] == 2]
            return fresh[0] if fresh else None

        again = wait_until(reasked, "the invalid answer to be asked again")
        assert again["prompt"] == question["prompt"]
        assert agentd.ctl("respond", job, again["id"], "yes", user=ann).returncode == 0
        assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
        assert agentd.ctl("logs", job, "review", user=ann).stdout == "answer yes\n"


    def test_huge_questions_still_leave_agentctl_an_answer(self, agentd: Agentd, users: tuple[User, User],
                                                            workdir: Path) -> None:
        # 90 prompts of the most a prompt may have would make an 18 MB reply, over the frame
        # cap: agentctl waited for good.
        ann, _ = users
        agentd.start()
        job = agentd.submit(write_workflow(workdir, "huge.py", HUGE_QUESTIONS), user=ann)
        pending = wait_until(lambda: len(agentd.status(job, user=ann)["pending"]) == 90 and
                             agentd.status(job, user=ann)["pending"], "the 90 questions to be asked")
        assert all(q["prompt"].startswith("Deploy? xxx") and q["prompt"].endswith(" [...]") for q in pending)
        assert all(len(q["prompt"]) < 5000 for q in pending)
        assert agentd.ctl("list", user=ann).returncode == 0 and agentd.ctl("top", "--json").returncode == 0
        assert agentd.ctl("cancel", job, user=ann).returncode == 0


class TestPauseResumeCancel:
    """pause checkpoints and stops a job; resume continues it; cancel ends it; none leaves a process."""

    def test_pause_then_resume(self, agentd: Agentd, users: tuple[User, User], workdir: Path,
                               outdir: Path) -> None:
        ann, _ = users
        agentd.start()
        job = agentd.submit(write_workflow(workdir, "steps.py", STEPS), "--param", f"out={outdir / 'log'}",
                            "--param", f"release={outdir / 'go'}", user=ann)
        agentd.wait_state(job, "second", "running")
        paused = agentd.ctl_json("pause", job, user=ann)  # answers once the job has stopped
        assert paused["status"] == "paused" and paused["states"]["first"] == "completed"
        wait_until(lambda: not processes_of({ann.uid}), "the paused job's processes to end", timeout=30)
        assert agentd.ctl("pause", job, user=ann).returncode == 0  # already paused: nothing to do
        done = agentd.ctl("respond", job, "any", "yes", user=ann)  # a paused job asks nothing
        assert done.returncode == 1 and f"its questions are asked again, with new ids, once it runs" \
            f" (agentctl resume {job})" in done.stderr, done.stderr
        (outdir / "go").touch()
        resumed = agentd.ctl_json("resume", job, user=ann)
        assert resumed["status"] in ("queued", "running")
        assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
        assert (outdir / "log").read_text().splitlines() == ["first", "second", "second"]  # first ran once
        done = agentd.ctl("resume", job, user=ann)
        assert done.returncode == 1 and "only a paused or failed job" in done.stderr

    def test_a_failing_states_traceback_names_the_jobs_file(self, agentd: Agentd, users: tuple[User, User],
                                                            workdir: Path) -> None:
        # The state's code travels by value to its process, which gives it its file back:
        # the job's, not that of whatever program holds the runner's __main__.
        ann, _ = users
        agentd.start()
        flow = write_workflow(workdir, "boom.py", BOOM)
        job = agentd.submit(flow, user=ann)
        text = json.dumps(agentd.wait_status(job, "failed"))
        assert f'File \\"{flow}\\", line 5, in helper' in text, text
        assert "spawner.py" not in text and "<dynamic-code>" not in text

    def test_a_job_name_that_would_write_to_a_terminal_is_refused(self, agentd: Agentd, users: tuple[User, User],
                                                                   workdir: Path) -> None:
        # `agentctl list` shows every user's job names to an admin: no escapes, no line breaks.
        ann, _ = users
        agentd.start()
        flow = write_workflow(workdir, "boom.py", BOOM)
        done = agentd.ctl("submit", str(flow), "--name", "a\nb\x1b[31mred", user=ann)
        assert done.returncode == 2 and "a job name must be printable text" in done.stderr
        assert agentd.ctl_json("list", user=ann) == []

    def test_cancel_running_and_queued_jobs(self, agentd: Agentd, users: tuple[User, User], workdir: Path,
                                            outdir: Path) -> None:
        ann, _ = users
        agentd.configure("max_running_jobs = 1\n")
        agentd.start()
        flow = write_workflow(workdir, "steps.py", STEPS)
        args = ("--param", f"out={outdir / 'log'}", "--param", f"release={outdir / 'go'}")
        running = agentd.submit(flow, *args, user=ann)
        agentd.wait_state(running, "second", "running")
        queued = agentd.submit(flow, *args, user=ann)
        assert agentd.status(queued)["status"] == "queued"  # one runner slot, taken
        assert agentd.ctl_json("cancel", queued, user=ann)["status"] == "cancelled"
        cancelled = agentd.ctl_json("cancel", running, user=ann)
        assert cancelled["status"] == "cancelled" and cancelled["states"]["second"] == "cancelled"
        wait_until(lambda: not processes_of({ann.uid}), "the cancelled job's processes to end", timeout=30)
        done = agentd.ctl("cancel", running, user=ann)
        assert done.returncode == 1 and "nothing to cancel" in done.stderr


class TestWatching:
    """logs -f follows a state until its job ends; top shows the box, the jobs and what waits."""

    def test_logs_follow_and_top(self, agentd: Agentd, users: tuple[User, User], workdir: Path,
                                 outdir: Path) -> None:
        ann, _ = users
        agentd.start()
        job = agentd.submit(write_workflow(workdir, "talker.py", TALKER), "--param", f"release={outdir / 'go'}",
                            user=ann)
        agentd.wait_state(job, "talk", "running")
        env = {"PATH": "/usr/bin:/bin", "AGENT_SOCKET": agentd.socket}
        with running_as(ann, [agentd.ctl_path, "logs", job, "talk", "-f"], env, workdir) as follow:
            assert follow.stdout is not None and follow.stdout.readline() == "hello\n"
            top = agentd.ctl_json("top", user=ann)
            assert [j["job"] for j in top["jobs"]] == [job] and top["agentd"]["user"] == ann.name
            assert top["pool"]["totals"]["cpu"] > 0 and not top["agentd"]["admin"]
            text = agentd.ctl("top", "--once", user=ann).stdout
            assert text.startswith("agentd ") and "running 1" in text and "talker" in text
            (outdir / "go").touch()
            rest, err = follow.communicate(timeout=120)
        assert follow.returncode == 0, err
        assert rest == "goodbye\n"
        assert agentd.status(job)["status"] == "completed"
        assert json.loads(agentd.ctl("logs", job, "talk", "--json", user=ann).stdout)["text"] == "hello\ngoodbye\n"

    def test_logs_follow_a_state_of_a_queued_job_and_end_quietly_when_their_reader_goes(
        self, agentd: Agentd, users: tuple[User, User], workdir: Path, outdir: Path,
    ) -> None:
        ann, _ = users
        agentd.configure("max_running_jobs = 1\n")
        agentd.start()
        holder = agentd.submit(write_workflow(workdir, "steps.py", STEPS), "--param", f"out={outdir / 'log'}",
                               "--param", f"release={outdir / 'go'}", user=ann)
        agentd.wait_state(holder, "second", "running")
        job = agentd.submit(write_workflow(workdir, "talker.py", TALKER), "--param", f"release={outdir / 'go2'}",
                            user=ann)
        assert agentd.status(job)["status"] == "queued"  # no state of it reported yet
        env = {"PATH": "/usr/bin:/bin", "AGENT_SOCKET": agentd.socket}
        argv = [agentd.ctl_path, "logs", job, "talk", "-f"]
        with running_as(ann, argv, env, workdir) as follow, running_as(ann, argv, env, workdir) as leaving:
            (outdir / "go").touch()  # the holder ends: the queued job starts
            assert follow.stdout is not None and leaving.stdout is not None
            assert follow.stdout.readline() == "hello\n" and leaving.stdout.readline() == "hello\n"
            leaving.stdout.close()  # as `| head -1` does
            (outdir / "go2").touch()
            rest, err = follow.communicate(timeout=120)
            _, left_err = leaving.communicate(timeout=120)
        assert (follow.returncode, rest) == (0, "goodbye\n"), err
        assert leaving.returncode == 1 and left_err == ""  # its next write found no reader: no traceback

    def test_logs_longer_than_one_reply_come_whole(self, agentd: Agentd, users: tuple[User, User],
                                                   workdir: Path) -> None:
        ann, _ = users
        agentd.start()
        job = agentd.submit(write_workflow(workdir, "loud.py", LOUD), user=ann)
        assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
        for state, word in ((None, "inline"), ("loud", "process")):  # the job's own log, and a state's
            out = agentd.ctl("logs", job, *([state] if state else []), user=ann).stdout
            lines = [line for line in out.splitlines() if line.startswith(word)]
            assert len(lines) == 30_000 and lines[-1].startswith(f"{word} 029999"), (state, len(out))
            assert f"{word.upper()}-END" in out

