"""Customer service: route a ticket by priority and tags; urgent answers get a human review.

The human review asks through ``context.human_in_the_loop``: on a terminal it prompts
you; elsewhere it waits for an answer from the programmatic queue and, after its
timeout, goes with the default ("approve").
"""

from dataclasses import dataclass, field
from typing import List

from agent import Agent, Context, StateResult, TypedContextData


@dataclass
class ServiceTicket(TypedContextData):
    ticket_id: str
    priority: str
    subject: str
    tags: List[str] = field(default_factory=list)


async def generate_priority_response() -> str:
    return "We are on it: an engineer will call you within 15 minutes."


agent = Agent("customer_service")


async def receive_ticket(context: Context) -> StateResult:
    if not context.has_state("ticket"):
        context.set_typed("ticket", ServiceTicket(ticket_id="T-1001", priority="high",
                                                  subject="Checkout is down", tags=["outage"]))
    return "handle_ticket"


async def handle_ticket(context: Context) -> StateResult:
    ticket = context.get_typed("ticket", ServiceTicket)
    if ticket.priority == "high":
        return "immediate_response"
    elif "bug" in ticket.tags:
        return "technical_review"
    else:
        return "standard_response"


async def immediate_response(context: Context) -> StateResult:
    response = await generate_priority_response()
    context.set_state("response", response)
    return "human_review"


async def technical_review(context: Context) -> StateResult:
    ticket = context.get_typed("ticket", ServiceTicket)
    context.set_state("response", f"Engineering is reproducing {ticket.ticket_id}.")
    return "send_response"


async def standard_response(context: Context) -> StateResult:
    context.set_state("response", "Thanks for reaching out; we will reply within a day.")
    return "send_response"


async def human_review(context: Context) -> StateResult:
    verdict = await context.human_in_the_loop(
        prompt=f"Send this reply? {context.get_state('response')!r} (approve/reject):",
        timeout=context.get_state("review_timeout", 30.0),
        validator=lambda answer: answer.strip().lower() in ("approve", "reject"),
        default="approve",
    )
    context.set_state("review", verdict.strip().lower())
    return "send_response" if verdict.strip().lower() == "approve" else "standard_response"


async def send_response(context: Context) -> StateResult:
    context.set_state("sent", context.get_state("response"))
    return None


for name, fn in [("receive_ticket", receive_ticket), ("handle_ticket", handle_ticket),
                 ("immediate_response", immediate_response), ("technical_review", technical_review),
                 ("standard_response", standard_response), ("human_review", human_review),
                 ("send_response", send_response)]:
    agent.add_state(name, fn)

if __name__ == "__main__":
    agent.run_sync()
    print(f"review: {agent.context.get_state('review') or 'not needed'}")
    print(f"sent: {agent.context.get_state('sent')}")
