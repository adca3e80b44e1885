"""vllm_mode="server": training against `python -m odpo_vllm.serve`, started here as a subprocess
on the tiny policy (the reference's `test_training_with_vllm`, which needs `trl vllm-serve`), and
the trainer's named errors when no such server answers (fast: no engine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.sampling.server_client import ServerClient
from conftest import ROOT, free_port, make_args, model_logprobs, train_rows



def needs_server(test):
    """Marks a test that uses the server subprocess (a vLLM engine, fresh imports)."""
    return pytest.mark.vllm(pytest.mark.slow(test))


SERVER_START_S = 300  # a vLLM start on two loaded cores: ~30-60 s


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def server_process(model_path, tmp_path_factory):
    """`python -m odpo_vllm.serve` on the tiny policy, in a session of its own; at the end it is
    stopped (SIGTERM, SIGKILL if that fails) and its whole process group found gone."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    for key in [k for k in env if k.startswith(("VLLM_LOGGING", "ODPO_VLLM_LOG"))]:
        env.pop(key)  # as from a user's shell (this process set them for its own engines): the server decides
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:  # a file, not a pipe: nobody reads a pipe once it serves
        process = subprocess.Popen([sys.executable, "-m", "odpo_vllm.serve", "--model", str(model_path), "--host",
                                    "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while f"ready at {url}" not in log_path.read_text():  # the one line it prints when it serves
            assert process.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no server within {SERVER_START_S}s: {log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield ServerClient(url, 60.0), process
        assert log_path.read_text().strip().splitlines() == [f"odpo_vllm.serve: {model_path} ready at {url} "
                                                             "(weights over odpo_gloo)"]  # a quiet console
    finally:  # (the last server test may have killed it already)
        if _process_group_alive(process.pid):
            os.killpg(process.pid, signal.SIGTERM)  # what stops a server: it closes its engine and exits
            try:
                assert process.wait(timeout=60) == 0
            finally:
                if _process_group_alive(process.pid):
                    os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _process_group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _process_group_alive(process.pid), "processes of the server's group outlived it"


@pytest.fixture
def server(server_process):
    return server_process[0]


def server_args(tmp_path, client: ServerClient, **overrides):
    settings = dict(use_vllm=True, vllm_mode="server", vllm_server_base_url=client.url, vllm_server_timeout=30,
                    max_steps=3, learning_rate=5e-2)
    settings.update(overrides)
    return make_args(tmp_path, **settings)


@needs_server
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_training_with_vllm_server(server, model_path, tmp_path, probe_ids, conversational):
    from transformers import AutoModelForCausalLM

    initial = model_logprobs(AutoModelForCausalLM.from_pretrained(model_path), probe_ids)
    trainer = OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=server_args(tmp_path, server),
                               train_dataset=toy.prompt_dataset(8, conversational=conversational))
    try:
        assert trainer.vllm_mode == "server" and trainer.vllm_client.url == server.url
        trainer.train()
        rows = train_rows(trainer)
        assert [row["step"] for row in rows] == [1, 2, 3]
        assert all(row["loss"] > 0 and row["sync/bytes"] > 0 for row in rows)
        assert max(row["sync/logprob_gap"] for row in rows) < 1e-4
        assert server.health()["policy_version"] == 3
        # the server serves the trained weights: its logprobs are the learner's, not the initial model's
        served = server.call("logprobs", {"token_ids": probe_ids})["logprobs"]
        import torch

        learned = model_logprobs(trainer.model, probe_ids)
        assert torch.allclose(torch.tensor(served), learned, atol=1e-4)
        assert (learned - initial).abs().max() > 1e-2  # training moved them, so the check above can fail
    finally:
        trainer.close()
    assert server.health()["status"] == "ok"  # closing the trainer leaves the server running


@needs_server
def test_the_trainers_sampling_settings_reach_the_server(server, model_path, tmp_path):
    """The server samples with the attached trainer's settings (here a regex every completion
    must match, and max_new_tokens), not its own."""
    import re

    pattern = "(good|great|fun)( (good|great|fun)){0,3}"
    args = server_args(tmp_path, server, vllm_structured_outputs_regex=pattern, max_new_tokens=16, max_steps=1)
    with OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(8)) as trainer:
        trainer.train()
        rows = [trainer.encoder.encode(row, i) for i, row in enumerate(toy.prompts(4, seed=5))]
        rollouts = trainer.generator.generate(rows, 2, seed=7)
    texts = trainer.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    assert all(len(ids) <= 16 for ids in rollouts.completion_ids)
    words = {"good", "great", "fun"}

    def matches_or_was_cut(text: str, ids: list[int]) -> bool:  # max_new_tokens may end a match part-way
        if re.fullmatch(pattern, text.strip()):
            return True
        *first, last = text.split() or [""]
        return len(ids) == 16 and set(first) <= words and any(word.startswith(last) for word in words)

    assert texts and all(matches_or_was_cut(t, ids) for t, ids in zip(texts, rollouts.completion_ids)), texts


@needs_server
def test_second_trainer_attaches_after_the_first_closed(server, model_path, tmp_path, probe_ids):
    """Two runs in turn, on the same group port: the second gets its own weights to the server
    (a gap of zero at its first sync, while the server still held the first run's trained weights)."""
    port = free_port()
    with OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward,
                          args=server_args(tmp_path / "a", server, vllm_group_port=port, max_steps=2),
                          train_dataset=toy.prompt_dataset(8)) as first:
        first.train()
    attached = server.health()["attached"]
    with OnlineDPOTrainer(model_path, reward_funcs=toy.short_reward,
                          args=server_args(tmp_path / "b", server, vllm_group_port=port, max_steps=2, seed=1),
                          train_dataset=toy.prompt_dataset(8, seed=1)) as second:
        assert server.health()["attached"] == attached + 1
        second.train()
        rows = train_rows(second)
        assert [row["step"] for row in rows] == [1, 2]
        assert max(row["sync/logprob_gap"] for row in rows) < 1e-4
        served = server.call("logprobs", {"token_ids": probe_ids})["logprobs"]
        first_logprobs = model_logprobs(first.model, probe_ids)
        import torch

        assert torch.allclose(torch.tensor(served), model_logprobs(second.model, probe_ids), atol=1e-4)
        assert not torch.allclose(torch.tensor(served), first_logprobs, atol=1e-3)


@needs_server
def test_a_trainer_that_never_closed_does_not_hold_the_server(server, model_path, tmp_path, probe_ids):
    """A run that ended without closing (a crash) leaves its side of the transport open on the
    server: the next trainer takes the server over, and the old one can neither sample nor, when
    it closes late, close the new one's transport."""
    import torch

    from odpo_vllm.sampling.server_client import ServerError

    stale = OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward,
                             args=server_args(tmp_path / "a", server, vllm_group_port=free_port(), max_steps=1),
                             train_dataset=toy.prompt_dataset(8))
    try:
        stale.train()
        with OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward,
                              args=server_args(tmp_path / "b", server, vllm_group_port=free_port(), max_steps=2,
                                               seed=1),
                              train_dataset=toy.prompt_dataset(8, seed=1)) as current:
            with pytest.raises(ServerError, match="another trainer attached to this server since"):
                stale.generator.generate([[1, 2, 3]], 2, seed=0)
            stale.close()  # late: must leave the current trainer's transport open
            current.train()
            assert max(row["sync/logprob_gap"] for row in train_rows(current)) < 1e-4
            served = server.call("logprobs", {"token_ids": probe_ids})["logprobs"]
            assert torch.allclose(torch.tensor(served), model_logprobs(current.model, probe_ids), atol=1e-4)
    finally:
        stale.close()


@needs_server
def test_resume_pushes_the_checkpoint_to_the_server(server, model_path, tmp_path, probe_ids):
    """A run resumed from a checkpoint gives the server the checkpoint's weights before it samples,
    and ends where an uninterrupted run ends."""
    import torch

    from conftest import StopAt

    def run(output_dir, callbacks=(), resume=None):
        args = server_args(tmp_path, server, output_dir=output_dir, save_strategy="steps", save_steps=1)
        with OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=args, callbacks=list(callbacks),
                              train_dataset=toy.prompt_dataset(8)) as trainer:
            trainer.train(resume_from_checkpoint=resume)
            served = torch.tensor(server.call("logprobs", {"token_ids": probe_ids})["logprobs"])
            return train_rows(trainer), served, model_logprobs(trainer.model, probe_ids)

    whole, whole_served, whole_learned = run(tmp_path / "whole")
    run(tmp_path / "cut", [StopAt(2)])
    resumed, served, learned = run(tmp_path / "cut", resume=True)
    assert [row["step"] for row in resumed] == [1, 2, 3]  # the checkpoint's rows, then the step trained now
    assert resumed[-1]["sync/logprob_gap"] < 1e-4
    assert resumed[-1]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-5)
    assert torch.allclose(served, learned, atol=1e-4) and torch.allclose(learned, whole_learned, atol=1e-5)


@needs_server
def test_server_refuses_another_architecture(server, models_dir, tmp_path):
    other = toy.build_model(models_dir / "three_layers", layers=3)
    with pytest.raises(ValueError, match=r"does not match the served model .*(missing|unknown) names"):
        OnlineDPOTrainer(other, reward_funcs=toy.sentiment_reward, args=server_args(tmp_path, server),
                         train_dataset=toy.prompt_dataset(4))
    assert server.health()["status"] == "ok"


def test_no_server_fails_with_a_named_error_within_the_timeout(model_path, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = make_args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=url, vllm_server_timeout=3)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"no vLLM server answered at {url} within 3s.*python -m odpo_vllm.serve"):
        OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=args, train_dataset=toy.prompt_dataset(4))
    assert time.monotonic() - start < 15


@needs_server
def test_a_server_that_dies_fails_the_run_with_an_error_naming_it(server_process, model_path, tmp_path):
    """(Last: it kills the module's server.) Server mode does not replace a server: the call that
    finds it gone fails the run, naming the server and how to go on."""
    from odpo_vllm.sampling.server_client import ServerGone

    client, process = server_process
    trainer = OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=server_args(tmp_path, client),
                               train_dataset=toy.prompt_dataset(8))
    try:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        start = time.monotonic()
        with pytest.raises(ServerGone, match=rf"vLLM server at {client.url} did not answer /generate .*does not "
                                             r"restart a server: start it with `python -m odpo_vllm.serve"):
            trainer.train()
        assert time.monotonic() - start < 30
    finally:
        trainer.close()  # closing its side of the transport fails quietly: the server is gone


def test_a_server_that_is_not_odpo_vllm_serve_is_named(model_path, tmp_path):
    """Something else answers at the URL (a `trl vllm-serve`, whose /health says only "ok"): a
    named error at once, not a KeyError or a wait."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from odpo_vllm.sampling.server_client import ServerError

    class TrlLikeHealth(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = HTTPServer(("127.0.0.1", 0), TrlLikeHealth)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        args = make_args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=url, vllm_server_timeout=30)
        start = time.monotonic()
        with pytest.raises(ServerError, match=rf"the server at {url} is not odpo_vllm.serve .*python -m odpo_vllm.serve"):
            OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=args,
                             train_dataset=toy.prompt_dataset(4))
        assert time.monotonic() - start < 10
    finally:
        other.shutdown()
        other.server_close()
