"""The one way the driver waits for Ray actors: a deadline, and an error that names who did not answer."""

from __future__ import annotations


class ActorDied(RuntimeError):
    """An actor's process is gone (the error names it)."""


def wait_for(refs: list, names: list[str], timeout_s: float, who: str, call: str) -> list:
    """The results of Ray calls `refs` (made to the actors `names`, in order), or an error that
    names the actors which did not answer `call` within `timeout_s` (TimeoutError) or died."""
    import ray

    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [names[refs.index(ref)] for ref in pending]
        raise TimeoutError(f"{who}: {', '.join(late)} did not answer {call}() within {timeout_s:.0f}s")
    results = []
    for name, ref in zip(names, refs):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayActorError as err:
            raise ActorDied(f"{who}: {name} died during {call}() ({type(err).__name__})") from err
    return results
