"""Generate the demo corpus (stories.jsonl) and its Generic vocabulary (vocab.txt). Deterministic; no downloads.

Every document is one chat turn in the serving format: "User: <a request for a story>\\n\\nAssistant: <a story>".
The stories come from a small hand-written grammar (characters, places, things, and a plot of wish -> trouble ->
help -> ending), so a model of a million parameters can learn their shape in a few CPU minutes. The text is
written for this project and is in the public domain.

The vocabulary holds every single byte (so any UTF-8 text can be encoded) plus the most frequent words and
punctuation runs of the corpus, 1023 tokens in all; id 0 is end-of-document, so vocab_size is 1024.

    python data/demo/make_corpus.py            # rewrites stories.jsonl and vocab.txt beside this file
"""

from __future__ import annotations

import collections
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_STORIES = 1600
VOCAB_TOKENS = 1023  # + id 0 = 1024 = vocab_size of config/model/demo.toml
SEED = 2026

# (noun phrase, pronoun subject, possessive, home place)
CHARACTERS = [
    ("a little fox", "she", "her", "the forest"), ("an old fisherman", "he", "his", "the sea"),
    ("a young girl named Mia", "she", "her", "a small village"), ("a brave knight", "he", "his", "an old castle"),
    ("a small robot", "it", "its", "a big city"), ("a kind dragon", "she", "her", "a high mountain"),
    ("a sleepy cat", "he", "his", "a warm kitchen"), ("a curious owl", "she", "her", "the forest"),
    ("a tiny mouse", "he", "his", "a quiet farm"), ("a lonely whale", "she", "her", "the sea"),
    ("a boy named Leo", "he", "his", "a small village"), ("a wise turtle", "he", "his", "a quiet river"),
    ("a clever crow", "she", "her", "a big city"), ("a shy rabbit", "he", "his", "a green meadow"),
    ("a happy dog named Max", "he", "his", "a quiet farm"), ("a little star", "she", "her", "the night sky"),
    ("a young sailor", "she", "her", "the sea"), ("an old bear", "he", "his", "a snowy hill"),
    ("a busy bee", "she", "her", "a green meadow"), ("a gentle giant", "he", "his", "a high mountain"),
    ("a small seal", "she", "her", "the sea"), ("a girl named Rosa", "she", "her", "a big city"),
    ("a baker named Tom", "he", "his", "a small village"), ("a silver fish", "it", "its", "a quiet river"),
]
PLACES = ["the sea", "the forest", "a small village", "an old castle", "a big city", "a high mountain",
          "a quiet river", "a green meadow", "the night sky", "a snowy hill", "a quiet farm", "the moon",
          "a sandy beach", "a dark cave", "a warm kitchen", "an island"]
THINGS = [("a golden key", "shone in the light"), ("a red kite", "danced in the wind"),
          ("an old map", "showed a secret path"), ("a little lantern", "glowed softly"),
          ("a pink seashell", "sang like the waves"), ("a blue stone", "was warm to touch"),
          ("a lost letter", "had no name on it"), ("a wooden boat", "was small but strong"),
          ("a magic book", "could tell stories"), ("a silver bell", "rang all by itself"),
          ("a green apple", "smelled sweet"), ("a broken clock", "had stopped at noon")]
WISHES = ["to see the whole world", "to find a true friend", "to learn a new song", "to fly above the clouds",
          "to find the way home", "to help everyone in {home}", "to be brave", "to visit the moon",
          "to find a hidden treasure", "to make someone smile"]
TROUBLES = ["a big storm came", "the path was lost in the fog", "the night grew very dark",
            "a tall wall stood in the way", "the river was too wide to cross", "the wind blew everything away",
            "the snow covered every road", "a loud noise scared everyone", "the food ran out",
            "the bridge was broken"]
HELPERS = ["a kind old woman", "a friendly frog", "a wise owl", "a little bird", "a gentle horse",
           "a group of children", "a tired traveler", "a playful dolphin", "a quiet moon", "a brave ant"]
FEELINGS = ["happy", "sad", "scared", "curious", "tired", "hopeful", "proud", "calm"]
LESSONS = ["friends make every road shorter", "it is good to ask for help", "small acts of kindness matter",
           "being brave does not mean never being scared", "home is where your friends are",
           "patience brings good things", "sharing makes joy bigger", "every storm ends"]
TIMES = ["Once upon a time", "Long ago", "One bright morning", "One cold winter", "A long time ago",
         "One summer evening", "Many years ago"]
REQUESTS = ["Tell me a story about {t}.", "Tell me a story about {t}.", "Tell me a story about {t}.",
            "Can you tell me a story about {t}?", "Write a short story about {t}.",
            "Please tell me a story about {t}.", "I would like a story about {t}.",
            "Tell me a short story about {t}."]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def the(noun_phrase: str) -> str:
    """'a little fox' -> 'the little fox'; names stay names ('a girl named Mia' -> 'Mia')."""
    if " named " in noun_phrase:
        return noun_phrase.rsplit(" ", 1)[1]
    return re.sub(r"^(a|an) ", "the ", noun_phrase)


def story(rng: random.Random) -> tuple[str, str]:
    """(topic, story text)."""
    hero, he, his, home = rng.choice(CHARACTERS)
    thing, thing_trait = rng.choice(THINGS)
    place = rng.choice([p for p in PLACES if p != home])
    helper = rng.choice(HELPERS)
    wish = rng.choice(WISHES).format(home=home)
    trouble = rng.choice(TROUBLES)
    feel_a, feel_b = rng.sample(FEELINGS, 2)
    name = the(hero)
    topic = rng.choice([hero, home, place, thing, home])

    s = [f"{rng.choice(TIMES)}, there was {hero} who lived in {home}."]
    s.append(rng.choice([
        f"Every day, {name} looked at {place} and wished {wish}.",
        f"More than anything, {name} wanted {wish}.",
        f"{cap(he)} was {feel_a}, because {he} wanted {wish}.",
    ]))
    if topic in (home, place) and topic != home:
        s.append(f"People said that {place} was full of wonders.")
    s.append(rng.choice([
        f"One day, {name} found {thing}. It {thing_trait}.",
        f"One morning, {name} saw {thing} near {home}. It {thing_trait}.",
        f"Then {name} found {thing} that {thing_trait}.",
    ]))
    s.append(rng.choice([
        f"So {name} took it and set off for {place}.",
        f"With {thing} in {his} bag, {name} began the long walk to {place}.",
        f"{cap(name)} decided to go to {place} at once.",
    ]))
    s.append(rng.choice([
        f"But on the way, {trouble}.",
        f"Soon {trouble}, and {name} felt {feel_b}.",
        f"Halfway there, {trouble}.",
    ]))
    s.append(rng.choice([
        f"Just then, {helper} came by and said, \"Do not worry, I will help you.\"",
        f"{cap(helper)} saw {name} and asked, \"Why are you {feel_b}?\"",
        f"Luckily, {helper} knew the way and walked with {name}.",
    ]))
    s.append(rng.choice([
        f"Together they went on, and {the(thing)} {thing_trait}.",
        f"{cap(name)} held {the(thing)} high, and the way became clear.",
        f"They shared {the(thing)} and kept going, step by step.",
    ]))
    s.append(rng.choice([
        f"At last, {name} reached {place}. It was more beautiful than {he} had ever dreamed.",
        f"In the end, {name} came to {place}, and {his} wish came true.",
        f"When the sun rose, {name} stood in {place} and smiled.",
    ]))
    s.append(rng.choice([
        f"{cap(name)} thanked {the(helper)} and went back to {home}.",
        f"From that day on, {name} and {the(helper)} were the best of friends.",
        f"Later, {name} told everyone in {home} about the journey.",
    ]))
    s.append(rng.choice([f"And {name} learned that {rng.choice(LESSONS)}.", "The end.",
                         f"{cap(name)} learned that {rng.choice(LESSONS)}. The end."]))
    return topic, " ".join(s)


def document(rng: random.Random) -> str:
    topic, text = story(rng)
    return f"User: {rng.choice(REQUESTS).format(t=topic)}\n\nAssistant: {text}"


def build_vocab(texts: list[str], size: int) -> list[bytes]:
    """Every byte 0x01..0xff, then the corpus's words (with their leading space) and punctuation runs, then its
    commonest word pairs until `size` tokens."""
    tokens = [bytes([b]) for b in range(1, 256)]
    words: collections.Counter = collections.Counter()
    pairs: collections.Counter = collections.Counter()
    for text in texts:
        # a space always starts the next word's token (" Once"), never ends punctuation, so a prompt that ends
        # with "Assistant:" stops on a token boundary the model has seen in training
        pieces = re.findall(r" ?[A-Za-z]+|[.,!?:\"]+|\n+", text)
        words.update(pieces)
        pairs.update(a + b for a, b in zip(pieces, pieces[1:]) if b.startswith(" ") and a[-1:].isalpha())
    have = set(tokens)
    for piece, _ in words.most_common() + pairs.most_common():
        data = piece.encode("utf-8")
        if len(tokens) >= size:
            break
        if data not in have:
            tokens.append(data)
            have.add(data)
    return tokens


def main() -> int:
    rng = random.Random(SEED)
    docs = [document(rng) for _ in range(NUM_STORIES)]
    with open(HERE / "stories.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    sys.path.insert(0, str(HERE.parents[1]))
    from rwkv_app.tokenizer import create_vocab_file_from_tokens

    create_vocab_file_from_tokens(build_vocab(docs, VOCAB_TOKENS), HERE / "vocab.txt")
    print(f"{len(docs)} stories, {sum(map(len, docs)):,} characters -> {HERE / 'stories.jsonl'}, {HERE / 'vocab.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
