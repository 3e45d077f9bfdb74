"""Text environments: the protocol (``base``) and one module per environment or task family."""
from .base import Episode, LMPolicy, TextEnv, VecEnv, rollout, rollout_many
from .feedback_tasks import FeedbackTaskEnv
from .guess_number import GuessNumber, bisect_policy
from .instruction_maze import InstructionMaze
from .textworld import GameFamily, TextWorldEnv, play_games, split_games

__all__ = ["Episode", "LMPolicy", "TextEnv", "VecEnv", "rollout", "rollout_many", "GuessNumber", "bisect_policy",
           "InstructionMaze", "FeedbackTaskEnv",
           "GameFamily", "TextWorldEnv", "play_games", "split_games"]
