"""Example 2: LLM processing pipeline with a quality gate and a regeneration loop.

``check_quality`` and ``extract_entities`` run in parallel and both return
``await_processing``, which therefore runs once, after both: the join is where the
decision is made. A low-confidence answer loops back through ``regenerate_text``
(bounded by ``max_steps``).
"""

from dataclasses import dataclass

from agent import Agent, Context, StateResult, TypedContextData


@dataclass
class LLMResponse(TypedContextData):
    text: str
    confidence: float
    tokens_used: int
    model: str


def fake_llm(prompt: str, attempt: int) -> LLMResponse:
    """A stand-in for a model call: the first draft is weak, the second is good."""
    confidence = 0.72 if attempt == 0 else 0.95
    return LLMResponse(text=f"Answer to {prompt!r} (draft {attempt + 1}). Paris is in France.",
                       confidence=confidence, tokens_used=150 + 40 * attempt, model="gpt-4")


agent = Agent("llm_processor", max_steps=50)


async def generate_text(context: Context) -> StateResult:
    attempt = context.get_state("generations", 0)
    response = fake_llm(context.get_state("prompt", "Where is Paris?"), attempt)
    context.set_state("generations", attempt + 1)
    context.set_typed("llm_response", response)
    return ["check_quality", "extract_entities"]


async def check_quality(context: Context) -> StateResult:
    response = context.get_typed("llm_response", LLMResponse)
    context.set_state("quality_ok", response.confidence >= 0.9)
    return "await_processing"


async def extract_entities(context: Context) -> StateResult:
    response = context.get_typed("llm_response", LLMResponse)
    entities = sorted({w.strip(".?'\"") for w in response.text.split() if w[:1].isupper() and w != "Answer"})
    context.set_state("entities", entities)
    return "await_processing"


async def regenerate_text(context: Context) -> StateResult:
    context.set_state("regenerated", context.get_state("regenerated", 0) + 1)
    return "generate_text"


async def await_processing(context: Context) -> StateResult:
    if not context.get_state("quality_ok"):
        return "regenerate_text"
    response = context.get_typed("llm_response", LLMResponse)
    context.set_state("final", {"text": response.text, "entities": context.get_state("entities"),
                                "tokens": response.tokens_used})
    return None


agent.add_state("generate_text", generate_text)
agent.add_state("check_quality", check_quality)
agent.add_state("extract_entities", extract_entities)
agent.add_state("regenerate_text", regenerate_text)
agent.add_state("await_processing", await_processing)

if __name__ == "__main__":
    agent.run_sync()
    final = agent.context.get_state("final")
    print(f"answer: {final['text']}")
    print(f"entities: {', '.join(final['entities'])}  tokens: {final['tokens']:,}")
