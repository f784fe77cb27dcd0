"""Natural prompts written for this book (nothing is downloaded): short passages in several
registers, with the sentence boundaries, commas and line breaks that prompt-dependent sinks form on.
"""

from __future__ import annotations

import random

import numpy as np

from .errors import CatchtagError

PASSAGES = [
    "The train left the station at dawn. By noon it had crossed the river, and the passengers were asleep.",
    "My grandmother kept bees. Every summer she gave honey to the neighbours, who paid her in eggs and gossip.",
    "Water boils at one hundred degrees Celsius at sea level. On a high mountain, it boils at a lower temperature.",
    "Dear Sam,\nThank you for the books. I have read two of them already.\nSee you in June,\nAlex",
    "To make tea, heat the water. Pour it over the leaves, wait three minutes, and remove the leaves.",
    "The meeting is moved to Thursday. Please bring the budget, the schedule, and your questions.",
    "She opened the door slowly. The room was dark; somewhere a clock was ticking.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "Ingredients:\n- two eggs\n- a cup of flour\n- a pinch of salt\nMix them well, then bake for twenty minutes.",
    "The results were clear: the new method was faster, cheaper, and easier to teach.",
    "When the storm came, the fishermen pulled their boats onto the beach. Nobody went out for three days.",
    "Q: What is the largest planet in the solar system?\nA: Jupiter, which is more than ten times wider than Earth.",
    "He said he would call. He did not call. The next morning, he sent a letter instead.",
    "The library opens at nine. Children's books are on the first floor, and the reading room is upstairs.",
    "First, wash the rice. Second, add twice as much water. Third, cook it slowly with the lid on.",
    "In 1969, two astronauts walked on the Moon. Millions of people watched on television.",
    "The cat sat on the mat. The dog lay by the fire. The bird sang in its cage.",
    "Our team won the match, three goals to one. The coach was proud, but the players were exhausted.",
    "It was a quiet town. There was one school, one bakery, and a church with a broken bell.",
    "The report has three parts. The first describes the data; the second, the method; the third, the results.",
    "Photosynthesis turns light into chemical energy. Plants, algae, and some bacteria use it to grow.",
    "I missed the bus, so I walked. It started to rain, and by the time I arrived I was soaked.",
    "The museum has a new exhibit on ancient Egypt. It includes jewellery, tools, and a small mummy.",
    "Turn left at the bakery. Walk two blocks, then cross the bridge. The house is the blue one on the right.",
]

# The paper's teaser (Fig. 1): three sentences with different emotions in one prompt, each of
# which it shows caught by a different sink. The sentences are ours.
EMOTION_SENTENCES = [
    "I am so happy today.",
    "I feel terribly sad and alone.",
    "I am furious about what they did.",
]


def natural_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """`n` passages (all when n is None), in an order fixed by `seed`."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise CatchtagError(f"n_prompts={n!r} is not valid: use a whole number from 1 to {len(PASSAGES)}")
    if n is not None and n > len(PASSAGES):
        raise CatchtagError(f"n_prompts={n} is more than the {len(PASSAGES)} passages we have: use at most {len(PASSAGES)}")
    order = list(range(len(PASSAGES)))
    random.Random(seed).shuffle(order)
    return [PASSAGES[i] for i in order[: n or len(PASSAGES)]]


def emotion_prompt(separator: str = " ") -> tuple[str, list[tuple[int, int]]]:
    """The teaser prompt and the character span (start, stop) of each sentence in it.

    Each sentence's span includes the separator before it, so the spans tile the text and a token
    that starts with that separator (' I' in most tokenizers) belongs to the sentence it begins:
    that first token is the one most likely to be the sentence's own sink."""
    text, spans = "", []
    for i, sentence in enumerate(EMOTION_SENTENCES):
        start = len(text)
        if i:
            text += separator
        text += sentence
        spans.append((start, len(text)))
    return text, spans


# --------------------------------------------------------------------------------------------------
# Stories: longer passages of three sentences (the catch, tag and qknorm chapters; written by the
# catchtag authors; several sentences each, some with line breaks; moved here from catchtag.tags)

STORIES: list[str] = [
    "The storm rolled in over the hills. Farmers hurried to bring the cattle inside. By nightfall, "
    "the rain had flooded the lower fields.",
    "She opened the letter with shaking hands. It was from her brother, who had been gone for ten "
    "years. He wrote that he was coming home.",
    "Preheat the oven to two hundred degrees. Mix the flour, sugar and butter in a large bowl. Pour "
    "the batter into a tin and bake it for forty minutes.",
    "The museum opens at nine in the morning. Tickets are cheaper for students and children. On "
    "Sundays, the top floor is closed for cleaning.",
    "My grandfather kept bees behind his house. Every summer he gave jars of honey to the "
    "neighbours. Nobody ever got stung, except him.",
    "The train was late again this morning. Most passengers waited quietly on the platform. A few "
    "gave up and called a taxi instead.",
    "Water boils at a lower temperature on a mountain. The air pressure there is lower than at sea "
    "level. This is why pasta takes longer to cook at altitude.",
    "Dear Anna,\nThank you for the lovely flowers. They brightened up the whole kitchen. I hope we "
    "can meet again soon.\nBest wishes,\nMaria",
    "Shopping list:\n- two loaves of bread\n- a dozen eggs\n- fresh tomatoes\nRemember to pay the "
    "electricity bill as well.",
    "The meeting started ten minutes late. The manager apologised and went straight to the budget. "
    "Nobody asked any questions until the very end.",
    "Cats sleep for most of the day. They are most active at dawn and at dusk. Many owners find "
    "this pattern hard to get used to.",
    "He missed the last bus, so he walked home. The streets were empty and quiet. When he finally "
    "arrived, the lights were still on.",
    "The river freezes every winter. Children skate on it when the ice is thick enough. In spring, "
    "the melting ice makes a loud cracking noise.",
    "I tried to fix the bicycle myself. First the chain came off, then a tyre went flat. In the end "
    "I took it to the shop on the corner.",
    "The library is moving to a new building. All books must be returned by Friday. The new "
    "reading room will have large windows and more seats.",
    "Question: Why is the sky blue?\nAnswer: Sunlight is scattered by the air. Blue light is "
    "scattered more than red light, so the sky looks blue.",
]


def story_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """`n` of the book's prompts (all when n is None), in a fixed order shuffled by `seed`."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise CatchtagError(f"n_prompts={n!r} is not valid: use a whole number >= 1")
    order = np.random.default_rng(seed).permutation(len(STORIES)) if seed else np.arange(len(STORIES))
    chosen = [STORIES[i] for i in order]
    if n is not None and n > len(chosen):
        raise CatchtagError(f"n_prompts={n} is more than the {len(STORIES)} prompts in catchtag.prompts.STORIES")
    return chosen if n is None else chosen[:n]
