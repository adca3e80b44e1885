"""The reward and KL curves of a run as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

REWARD_KEYS = ("objective/scores", "objective/rlhf_reward", "rewards/chosen", "rewards/rejected")
KL_KEYS = ("objective/kl",)


def plot_training_curves(log_history: list[dict], path: str) -> str | None:
    """Two panels: external reward (and the implicit DPO rewards) and KL, against step."""
    rows = [row for row in log_history if "objective/scores" in row]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key in REWARD_KEYS:
        top.plot(steps, [row.get(key) for row in rows], marker=".", label=key)
    top.set_ylabel("reward")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    for key in KL_KEYS:
        bottom.plot(steps, [row.get(key) for row in rows], marker=".", color="tab:red", label=key)
    bottom.set_ylabel("KL (nats, per sequence)")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.suptitle("Online DPO training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
