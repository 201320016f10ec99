"""Example 1: text processing pipeline (clean -> analyze -> format)."""

import time

from agent import Agent, Context, StateResult

agent = Agent("text_processor")


async def clean_text(context: Context) -> StateResult:
    text = context.get_state("raw_text", "Hello   World!  ")
    cleaned = " ".join(text.split())
    context.set_state("cleaned_text", cleaned)
    return "analyze_text"


async def analyze_text(context: Context) -> StateResult:
    text = context.get_state("cleaned_text")
    stats = {
        "length": len(text),
        "words": len(text.split()),
        "has_punctuation": "!" in text,
    }
    context.set_state("stats", stats)
    return "format_results"


async def format_results(context: Context) -> StateResult:
    result = {
        "text": context.get_state("cleaned_text"),
        "analysis": context.get_state("stats"),
        "timestamp": time.time(),
    }
    context.set_state("final_result", result)
    return None


agent.add_state("clean_text", clean_text)
agent.add_state("analyze_text", analyze_text)
agent.add_state("format_results", format_results)

if __name__ == "__main__":
    agent.run_sync()
    result = agent.context.get_state("final_result")
    analysis = result["analysis"]
    print(f"text: {result['text']!r}  length: {analysis['length']}  words: {analysis['words']}  "
          f"punctuation: {'yes' if analysis['has_punctuation'] else 'no'}")
