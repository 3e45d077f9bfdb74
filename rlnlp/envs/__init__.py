"""Text environments: the protocol (``base``) and one module per environment or task family."""
from .base import Episode, TextEnv, VecEnv, rollout
from .guess_number import GuessNumber, bisect_policy

__all__ = ["Episode", "TextEnv", "VecEnv", "rollout", "GuessNumber", "bisect_policy"]
