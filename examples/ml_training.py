"""Example 4: ML training pipeline with typed config and per-epoch metrics."""

import math
from dataclasses import dataclass

from agent import Agent, Context, ResourceRequirements, StateResult, TypedContextData


@dataclass
class TrainingConfig(TypedContextData):
    model_name: str
    batch_size: int
    epochs: int
    learning_rate: float


@dataclass
class TrainingMetrics(TypedContextData):
    loss: float
    accuracy: float
    epoch: int


agent = Agent("ml_trainer")


async def prepare_training(context: Context) -> StateResult:
    config = TrainingConfig(model_name="my_model", batch_size=32, epochs=10, learning_rate=0.001)
    context.set_typed("config", config)
    return "train_model"


async def train_model(context: Context) -> StateResult:
    config = context.get_typed("config", TrainingConfig)
    for epoch in range(config.epochs):
        # A stand-in for real training: accuracy rises with each epoch.
        accuracy = 1.0 - 0.5 * math.exp(-0.6 * (epoch + 1))
        metrics = TrainingMetrics(loss=round(1.0 - accuracy, 4), accuracy=round(accuracy, 4), epoch=epoch)
        context.set_typed(f"metrics_epoch_{epoch}", metrics)
        context.set_state("last_epoch", epoch)
        if metrics.accuracy > 0.98:  # early stopping
            return "evaluate_model"
    return "evaluate_model"


async def evaluate_model(context: Context) -> StateResult:
    last = context.get_state("last_epoch")
    final = context.get_typed(f"metrics_epoch_{last}", TrainingMetrics)
    context.set_state("evaluation", {"epochs_run": last + 1, "accuracy": final.accuracy})
    return None


agent.add_state("prepare_training", prepare_training)
agent.add_state("train_model", train_model, resources=ResourceRequirements(cpu_units=1.0, memory_mb=256))
agent.add_state("evaluate_model", evaluate_model)

if __name__ == "__main__":
    agent.run_sync()
    evaluation = agent.context.get_state("evaluation")
    print(f"epochs run: {evaluation['epochs_run']}  accuracy: {evaluation['accuracy']:.1%}")
