"""The reward and KL curves of a run as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

SCORE_KEYS = ("objective/scores", "objective/rlhf_reward")
IMPLICIT_KEYS = ("rewards/chosen", "rewards/rejected")
KL_KEYS = ("objective/kl",)


def plot_training_curves(log_history: list[dict], path: str) -> str | None:
    """Three panels against step: external reward, DPO's implicit rewards, KL."""
    rows = [row for row in log_history if "objective/scores" in row]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    panels = [
        (SCORE_KEYS, "reward (external)"),
        (IMPLICIT_KEYS, "implicit DPO reward"),
        (KL_KEYS, "KL (nats / sequence)"),
    ]
    for axis, (keys, label) in zip(axes, panels):
        for key in keys:
            axis.plot(steps, [row.get(key) for row in rows], marker=".", label=key)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle("Online DPO training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
