"""A real task for a real model, offline: make a chat model's short replies warmer.

The prompts are everyday requests a person might type ("Write two sentences about rainy
Mondays."), built from topic and request lists shipped here; the reward is VADER's compound
sentiment score of the reply (the `vaderSentiment` package, a lexicon and rules, no model
download; -1 very negative .. +1 very positive). It is the chat-model version of TRL's classic
"positive IMDB continuations" example. Topics held out of training give prompts the policy never
trained on, scored before and after training to show whether the change generalises.
"""

from __future__ import annotations

import random

TOPICS = [
    "rainy Mondays", "your morning commute", "a crowded train", "doing the laundry", "a long queue at the bank",
    "waiting for a delayed flight", "a broken umbrella", "cold coffee", "a traffic jam", "winter evenings",
    "moving to a new city", "a noisy neighbour", "paying taxes", "a power cut", "losing your keys",
    "a job interview", "the first day at school", "learning to swim", "a slow internet connection",
    "cleaning the kitchen", "a missed bus", "a hospital waiting room", "a burnt dinner", "an empty fridge",
    "a long meeting", "a flat tyre", "doing homework", "a rainy holiday", "a cancelled concert",
    "getting a cold", "a dentist appointment", "a lost parcel", "an old laptop", "a heatwave",
    "a busy supermarket", "grey November skies", "a leaking roof", "the end of summer", "a hard exam",
    "saying goodbye to a friend", "a stray cat", "autumn leaves", "a quiet library", "a city at night",
    "a village bakery", "an old bicycle", "a mountain hike", "the sea in winter", "a garden after rain",
    "learning a new language", "cooking for friends", "a second-hand bookshop", "a football match",
    "a birthday party", "a thunderstorm", "a long walk home", "a small apartment", "working from home",
    "a school reunion", "a museum visit", "a road trip", "a camping night", "a family dinner",
    "a new phone", "a weekend market", "an early alarm clock", "a snow day", "a train journey",
    "a music lesson", "a local park", "a volunteer day", "a farmers' market",
]
HELD_OUT_TOPICS = [
    "a ferry crossing", "a rainy bus stop", "a broken washing machine", "a long night shift",
    "a crowded beach", "a rusty garden gate", "a chemistry lesson", "a shared office", "an old photograph",
    "a foggy morning", "a visit to the post office", "a noisy cafe", "a broken escalator", "a late pizza delivery",
    "a lighthouse at dusk", "a windy pier",
]
REQUESTS = [
    "Write two sentences about {}.",
    "Describe {} in one or two sentences.",
    "What do you think about {}? Answer briefly.",
    "Tell me how you feel about {}, in a short reply.",
]


def prompt_rows(topics: list[str], seed: int = 0, conversational: bool = True) -> list[dict]:
    """One row per (topic, request), shuffled with `seed`: `prompt` as chat messages (or a string)."""
    rows = [request.format(topic) for topic in topics for request in REQUESTS]
    random.Random(seed).shuffle(rows)
    if not conversational:
        return [{"prompt": text} for text in rows]
    return [{"prompt": [{"role": "user", "content": text}]} for text in rows]


def train_prompts(seed: int = 0) -> list[dict]:
    return prompt_rows(TOPICS, seed)


def held_out_prompts(seed: int = 0) -> list[dict]:
    return prompt_rows(HELD_OUT_TOPICS, seed)


_ANALYZER = None


def vader_scores(texts: list[str]) -> list[float]:
    global _ANALYZER
    if _ANALYZER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:
            raise ImportError("the real task's reward needs vaderSentiment: pip install vaderSentiment") from err
        _ANALYZER = SentimentIntensityAnalyzer()
    return [float(_ANALYZER.polarity_scores(text)["compound"]) for text in texts]


def vader_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """The reward function (odpo_vllm / TRL signature): VADER compound sentiment of each reply."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return vader_scores(texts)
