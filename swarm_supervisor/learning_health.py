"""The learning-health guard's reward side: a node's rolling reward against its best, and rounds in which it had
nothing to learn from. (Held-out accuracy's side is workers.shared_folder.held_out's trend.)"""

from collections import deque

from workers.shared_folder.held_out import HeldOutTrend

# reward collapse: the mean of the last REWARD_WINDOW rounds under REWARD_COLLAPSE x the best such mean so far
# (only once that best reached REWARD_FLOOR: a node that never earned reward has nothing to lose); it is over
# only when the mean is back above REWARD_RECOVERED x the best, so a mean that hovers at the line warns once
REWARD_WINDOW, REWARD_COLLAPSE, REWARD_RECOVERED, REWARD_FLOOR = 20, 0.5, 0.75, 0.2
# no learning signal: this many rounds in a row in which no group a node trained on had a reward spread (every
# completion of every group scored the same), so GRPO had no gradient and the weights never moved
NO_SIGNAL_ROUNDS = 20


class RewardWatch:
    """A node's rolling mean reward against its best rolling mean."""

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=REWARD_WINDOW)
        self.best: float | None = None
        self.down = False
        self.silent = 0         # rounds in a row without a group to learn from

    def add(self, reward: float, groups_with_signal: int | None = None) -> None:
        """One round's mean reward, and how many of its groups had a reward spread (None: not known)."""
        if groups_with_signal is not None:
            self.silent = self.silent + 1 if groups_with_signal == 0 else 0
        self.window.append(reward)
        if len(self.window) < REWARD_WINDOW:
            return
        mean = sum(self.window) / REWARD_WINDOW
        self.best = mean if self.best is None else max(self.best, mean)
        if self.best >= REWARD_FLOOR:
            self.down = mean < (REWARD_RECOVERED if self.down else REWARD_COLLAPSE) * self.best

    def collapsed(self) -> bool:
        return self.down

    def no_signal(self) -> bool:
        return self.silent >= NO_SIGNAL_ROUNDS

    def warning(self, node: str) -> str | None:
        if self.collapsed():
            return (f"{node}: reward collapsed to {sum(self.window) / REWARD_WINDOW:.3f} over the last "
                    f"{REWARD_WINDOW} rounds, from {self.best:.3f} at its best; its best model is in "
                    f"checkpoints/{node}/best/")
        if self.no_signal():
            return (f"{node}: nothing to learn from for {self.silent} rounds: every completion of every group scored "
                    f"the same (mean reward {self.window[-1]:.3f}), so no update moved the weights; a model that "
                    "never answers in the format needs a warm-up (WARMUP_STEPS, see base/meta.json), one that "
                    "always answers right needs harder TASKS")
        return None


def learning_alarm(trend: HeldOutTrend, rewards: RewardWatch | None) -> str | None:
    """The few words the table shows when a node unlearns."""
    if trend.falling and trend.newest is not None and trend.best is not None:
        return f"held-out falling: {trend.newest:.0%}, best {trend.best:.0%}"
    if rewards is not None and rewards.collapsed():
        return "reward collapsed"
    if rewards is not None and rewards.no_signal():
        return "no reward signal"
    return None
