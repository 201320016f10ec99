"""Quick start: two states passing data through the context."""

from agent import Agent, Context, StateResult

agent = Agent("hello_workflow")


async def process_data(context: Context) -> StateResult:
    result = "Hello, World!"
    context.set_state("greeting", result)
    return "format_output"


async def format_output(context: Context) -> StateResult:
    greeting = context.get_state("greeting")
    print(f"Result: {greeting}")
    context.set_state("formatted", f"<<{greeting}>>")
    return None


agent.add_state("process_data", process_data)
agent.add_state("format_output", format_output)

if __name__ == "__main__":
    agent.run_sync()
    print("status:", agent.status.value, "| formatted:", agent.context.get_state("formatted"))
