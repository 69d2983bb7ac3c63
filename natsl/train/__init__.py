"""`natsl train`: training and comparison of natsl models on synthetic recall tasks and local text (issue 9).

Multi-process training under torchrun: DDP by default, FSDP2 with sharded checkpoints with `--fsdp`
(`natsl.train.fsdp`).

Optional dependencies (`pip install 'natsl[train]'`): tqdm (progress bars), matplotlib (plots).
"""

from natsl.train.loop import MODEL_KINDS, ModelResult, TrainSettings, build_config, train_model
from natsl.train.tasks import TASKS, MQARTask, NeedleTask, SelectiveCopyTask, Task, TaskBatch, TextTask, make_task

__all__ = ["MODEL_KINDS", "MQARTask", "ModelResult", "NeedleTask", "SelectiveCopyTask", "TASKS", "Task", "TaskBatch",
           "TextTask", "TrainSettings", "build_config", "make_task", "train_model"]
