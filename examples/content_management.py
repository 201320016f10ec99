"""Content management: four parallel jobs on an article, joined once, then published."""

from dataclasses import dataclass, field
from typing import List

from agent import Agent, Context, StateResult, TypedContextData


@dataclass
class Article(TypedContextData):
    title: str
    body: str
    tags: List[str] = field(default_factory=list)


agent = Agent("content_management")

COMMON_TYPOS = {"teh": "the", "recieve": "receive", "seperate": "separate"}


async def receive_article(context: Context) -> StateResult:
    if not context.has_state("article"):
        context.set_typed("article", Article(
            title="Agents on one box",
            body="Teh scheduler will recieve each state and run it in a seperate process.",
            tags=["workflows"],
        ))
    return "process_article"


async def process_article(context: Context) -> StateResult:
    article = context.get_typed("article", Article)
    context.set_state("word_count", len(article.body.split()))
    return ["spell_check", "generate_summary", "extract_keywords", "create_images"]


async def spell_check(context: Context) -> StateResult:
    article = context.get_typed("article", Article)
    fixes = {}
    for word in article.body.split():
        fix = COMMON_TYPOS.get(word.lower())
        if fix is not None:
            fixes[word] = fix.capitalize() if word[:1].isupper() else fix
    context.set_state("spelling_fixes", fixes)
    return "await_completion"


async def generate_summary(context: Context) -> StateResult:
    article = context.get_typed("article", Article)
    context.set_state("summary", article.body.split(".")[0][:80])
    return "await_completion"


async def extract_keywords(context: Context) -> StateResult:
    article = context.get_typed("article", Article)
    words = [w.strip(".,").lower() for w in article.body.split()]
    context.set_state("keywords", sorted({w for w in words if len(w) > 6}))
    return "await_completion"


async def create_images(context: Context) -> StateResult:
    article = context.get_typed("article", Article)
    context.set_state("images", [f"cover-{article.title.lower().replace(' ', '-')}.png"])
    return "await_completion"


async def await_completion(context: Context) -> StateResult:
    # The branches ran side by side on the original text: apply the spelling fixes to all.
    article = context.get_typed("article", Article)
    fixes = context.get_state("spelling_fixes")

    def fixed(text: str) -> str:
        return " ".join(fixes.get(w, fixes.get(w.strip(".,"), w)) for w in text.split())

    keywords = [COMMON_TYPOS.get(k, k) for k in context.get_state("keywords")]
    context.update_typed("article", body=fixed(article.body), tags=article.tags + keywords[:3])
    context.set_state("summary", fixed(context.get_state("summary")))
    return "publish"


async def publish(context: Context) -> StateResult:
    article = context.get_typed("article", Article)
    context.set_state("published", {"title": article.title, "summary": context.get_state("summary"),
                                    "images": context.get_state("images"), "tags": article.tags})
    return None


for name, fn in [("receive_article", receive_article), ("process_article", process_article),
                 ("spell_check", spell_check), ("generate_summary", generate_summary),
                 ("extract_keywords", extract_keywords), ("create_images", create_images),
                 ("await_completion", await_completion), ("publish", publish)]:
    agent.add_state(name, fn)

if __name__ == "__main__":
    agent.run_sync()
    published = agent.context.get_state("published")
    print(f"published {published['title']!r}: {len(published['tags'])} tags, "
          f"{len(published['images'])} image(s)")
    print(f"summary: {published['summary']}")
