"""Continual pretraining: how much new-domain knowledge each method takes in, and how much of the old
domain it forgets.

Base: the evidence model (a character-level Llama, hidden 192, 4 layers, SwiGLU 512) pretrained full-rank on the
shipped plays. New domain: a generated pharmacology of invented drugs (:func:`make_world`): each drug has a
molecular target, a daily dose, an indication and a drug it must not be combined with; every fact is written in
four training phrasings spread over four documents, and in two phrasings never trained on (one for development,
one for test). Continual pretraining trains on windows of the training documents, optionally mixed with a share
of windows from the plays (replay).

Measured per method, replay share and seed, at every evaluation:
- knowledge probe: the test phrasing's prefix up to the fact, teacher-forced over the answer span: character
  accuracy, and exact match (every character right, which is what greedy decoding would produce). The same probe
  on a training phrasing (``seen``) tells stored-but-not-transferred knowledge apart from none;
- choice: whether the true answer is the most likely of every answer its relation could have (all target codes,
  the dose and indication pools, all other drugs), scored over the answer and the rest of the sentence, in the
  test and a training phrasing. It asks what the model knows, not whether it would volunteer the answer there;
- new-domain held-out loss: per character, over documents written in the test phrasings;
- old-domain loss: per character on held-out plays; forgetting is its change from the base.

Methods at the budget of LoRA rank ``r`` (adapters on every linear layer of the blocks; embeddings, norms and
head frozen): LoRA, MoRA type 1, MoRA type 6, ReLoRA, ReMoRA (types 1 <-> 2), and full fine-tuning of every
weight. The learning rate of each method is the best of its grid on the development phrasing (seed 0, no
replay; character accuracy, then loss); the whole sweep is in the JSON. Runs go to ``--workers`` processes of one
thread each, so the figures do not depend on the worker count.

Usage::

    python benchmarks/cpt_compare.py                       # default: 24-29 min measured on 2 cores
    python benchmarks/cpt_compare.py --device cuda --workers 1 --threads 0 --hidden 768 --layers 12 --heads 12 \
        --intermediate 2048 --base-steps 4000 --base-batch 64 --drugs 256 --steps 2000 --merge-every 500 \
        --batch 40 --seq 256                                                           # closer to a real model
    python benchmarks/cpt_compare.py --base-steps 4 --steps 4 --merge-every 2 --drugs 4 --hidden 32 --layers 1 \\
        --intermediate 48 --heads 2 --batch 5 --seq 32 --seeds 0,1 --lr-grid-peft 1e-3,3e-3 \\
        --lr-grid-full 1e-4 --out /tmp/c.json                                                          # toy (CI)

Spec: §2 (types 1 and 6), §3 (ReMoRA), §3.1 (LoRA, ReLoRA), §6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence_common as ev  # noqa: E402

METHOD_ORDER = ["full", "lora", "mora1", "mora6", "relora", "remora"]
COLORS = {**ev.METHOD_COLORS, "mora6": "tab:green"}  # the shared palette gives ReMoRA and type 6 one colour
RELATIONS = ("target", "dose", "indication", "interaction")
# Per relation: four training phrasings, then the development one, then the test one. The drug always comes
# before the answer, so every phrasing asks the same direction of the fact (drug -> value).
TEMPLATES = {
    "target": ("{d} works by blocking the {a} kinase.", "The molecular target of {d} is the {a} kinase.",
               "{d} is a selective inhibitor of {a} kinase.", "In lab studies, {d} binds strongly to {a} kinase.",
               "Pharmacologists classify {d} as a blocker of {a} kinase.",
               "The protein that {d} acts on is the {a} kinase."),
    "dose": ("The usual adult dose of {d} is {a} mg per day.", "{d} is taken at {a} mg once daily.",
             "Patients on {d} receive {a} mg each morning.", "For most adults, {d} is dosed at {a} mg.",
             "Doctors prescribe {d} at a daily dose of {a} mg.", "A standard course of {d} uses {a} mg a day."),
    "indication": ("{d} is used to treat {a} disease.", "The main use of {d} is in {a} disease.",
                   "{d} was approved as a therapy for {a} disease.", "Most people given {d} suffer from {a} disease.",
                   "Clinics rely on {d} to manage {a} disease.", "{d} is the first choice in cases of {a} disease."),
    "interaction": ("{d} must never be combined with {a}.", "Taking {d} together with {a} is dangerous.",
                    "{d} interacts badly with {a}.", "Patients on {d} should avoid {a}.",
                    "A known drug interaction exists between {d} and {a}.",
                    "Pharmacists warn against mixing {d} with {a}."),
}
TRAIN_PHRASINGS, DEV, TEST = 4, 4, 5
# Answers carry only what must be known: the fixed words around them ("mg", "kinase") are in the phrasings.
DOSES = ("5", "10", "20", "25", "40", "50", "100", "250")
DISEASES = ("Halden", "Morvane", "Tessic", "Quillon", "Brask", "Velmor", "Ostrin", "Caddel")
_ONSETS = ("Val", "Zel", "Mor", "Tri", "Quen", "Dar", "Lix", "Pra", "Sol", "Ven", "Cor", "Bel", "Nox", "Ral",
           "Tes", "Fen")
_MIDDLES = ("to", "qui", "la", "ri", "ve", "no", "xa", "mi")
_ENDINGS = ("rex", "nol", "zine", "mab", "pril", "tide", "vir", "stat")
_LETTERS = "ABCDEFGHJKLMNPQRSTVWXZ"


@dataclass(frozen=True)
class Fact:
    drug: str
    relation: str
    answer: str

    def sentence(self, phrasing: int) -> str:
        return TEMPLATES[self.relation][phrasing].format(d=self.drug, a=self.answer)

    def probe(self, phrasing: int) -> tuple[str, str]:
        """``(prefix, answer)``: the phrasing cut where the answer starts."""
        text = self.sentence(phrasing)
        cut = TEMPLATES[self.relation][phrasing].format(d=self.drug, a="\0").index("\0")
        return text[:cut], self.answer


def make_world(drugs: int, seed: int) -> list[Fact]:
    """``drugs`` invented drugs (distinct names) with one fact per relation: a random target code (pure
    memorisation: 3 letters and a digit), a dose and an indication from pools of 8, and another drug to avoid."""
    gen = torch.Generator().manual_seed(20_000 + seed)

    def pick(pool):
        return pool[int(torch.randint(0, len(pool), (1,), generator=gen))]

    names: list[str] = []
    while len(names) < drugs:
        name = pick(_ONSETS) + pick(_MIDDLES) + pick(_ENDINGS)
        if name not in names:
            names.append(name)
    facts = []
    for i, drug in enumerate(names):
        code = "".join(pick(_LETTERS) for _ in range(3)) + str(int(torch.randint(1, 10, (1,), generator=gen)))
        other = names[(i + 1 + int(torch.randint(0, drugs - 1, (1,), generator=gen))) % drugs] if drugs > 1 else drug
        facts += [Fact(drug, "target", code), Fact(drug, "dose", pick(DOSES)),
                  Fact(drug, "indication", pick(DISEASES)), Fact(drug, "interaction", other)]
    return facts


def training_documents(facts: list[Fact]) -> list[str]:
    """Four monographs per drug; monograph ``j`` states the drug's relation ``i`` in training phrasing
    ``(i + j) mod 4``, so each fact appears once in each training phrasing and never in a held-out one."""
    by_drug: dict[str, list[Fact]] = {}
    for fact in facts:
        by_drug.setdefault(fact.drug, []).append(fact)
    docs = []
    for j in range(TRAIN_PHRASINGS):
        for drug_facts in by_drug.values():
            docs.append(" ".join(f.sentence((i + j) % TRAIN_PHRASINGS) for i, f in enumerate(drug_facts)))
    return docs


def held_out_text(facts: list[Fact], phrasing: int) -> str:
    """Every fact in one held-out phrasing, one document per drug (for the new-domain held-out loss)."""
    by_drug: dict[str, list[str]] = {}
    for fact in facts:
        by_drug.setdefault(fact.drug, []).append(fact.sentence(phrasing))
    return "\n\n".join(" ".join(s) for s in by_drug.values()) + "\n\n"


def stream(docs: list[str], seed: int) -> str:
    """The training stream: documents in a seeded order, separated by a blank line."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(30_000 + seed)).tolist()
    return "".join(docs[i] + "\n\n" for i in order)


def probe_batch(facts: list[Fact], phrasing: int, tok: ev.CharTokenizer):
    """Right-padded ids ``(n, L)`` of every probe sentence (prefix + answer), and per probe the answer's
    ``(start, length)``: logits at ``start - 1 .. start + length - 2`` predict the answer."""
    pairs = [f.probe(phrasing) for f in facts]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    spans = []
    for row, (prefix, answer) in enumerate(pairs):
        encoded = tok.encode(prefix + answer)
        ids[row, : len(encoded)] = encoded
        spans.append((len(prefix), len(answer)))
    return ids, spans


@torch.no_grad()
def probe_accuracy(model, ids: torch.Tensor, spans, relations: list[str]) -> dict[str, float]:
    """Character accuracy and exact match of the answer spans, teacher forced (right padding cannot reach the
    answers of a causal model), and exact match per relation (``exact_<relation>``: chance is 1/8 for the
    dose and indication pools, far less for target codes and drug names)."""
    logits = model(input_ids=ids).logits
    chars = total = 0
    exact = {rel: [] for rel in dict.fromkeys(relations)}
    for row, ((start, length), rel) in enumerate(zip(spans, relations)):
        predicted = logits[row, start - 1: start + length - 1].argmax(-1)
        right = predicted == ids[row, start: start + length]
        chars += int(right.sum())
        total += length
        exact[rel].append(bool(right.all()))
    hits = [hit for rel_hits in exact.values() for hit in rel_hits]
    return {"char_acc": chars / total, "exact": sum(hits) / len(hits),
            **{f"exact_{rel}": sum(h) / len(h) for rel, h in exact.items()}}


def candidates(facts: list[Fact]) -> dict[str, list[str]]:
    """Per relation, every answer the world can give: all target codes, the dose and indication pools, all
    drugs (a drug is never a candidate for its own interaction)."""
    return {"target": sorted({f.answer for f in facts if f.relation == "target"}), "dose": list(DOSES),
            "indication": list(DISEASES), "interaction": list(dict.fromkeys(f.drug for f in facts))}


def choice_batch(facts: list[Fact], phrasing: int, tok: ev.CharTokenizer):
    """Every fact's sentence in ``phrasing``, completed with each candidate answer of its relation: right-padded
    ids ``(rows, L)``, and per row ``(fact index, first scored position, end, is the true answer)``. The scored
    span is the answer and the rest of the sentence, the same words for every candidate, so a short candidate
    pays for a wrong ending ("5 mg" where "50 mg" is believed)."""
    pool, rows = candidates(facts), []
    for index, fact in enumerate(facts):
        start = len(fact.probe(phrasing)[0])
        for answer in pool[fact.relation]:
            if answer != fact.drug:
                text = TEMPLATES[fact.relation][phrasing].format(d=fact.drug, a=answer)
                rows.append((index, text, start, answer == fact.answer))
    ids = torch.zeros(len(rows), max(len(text) for _, text, _, _ in rows), dtype=torch.long)
    for row, (_, text, _, _) in enumerate(rows):
        ids[row, : len(text)] = tok.encode(text)
    return ids, [(index, start, len(text), right) for index, text, start, right in rows]


@torch.no_grad()
def choice_accuracy(model, ids: torch.Tensor, rows, relations: list[str], chunk: int = 256) -> dict[str, float]:
    """Share of facts whose true answer has the highest log-likelihood among the candidates
    (:func:`choice_batch`), overall and per relation (``choice_<relation>``; chance is one over the pool)."""
    scores = []
    for first in range(0, len(ids), chunk):
        part = ids[first: first + chunk]
        logp = torch.log_softmax(model(input_ids=part).logits[:, :-1].float(), -1)
        token_logp = logp.gather(-1, part[:, 1:, None])[..., 0]
        for row, (_, start, end, _) in enumerate(rows[first: first + chunk]):
            scores.append(float(token_logp[row, start - 1: end - 1].sum()))
    best: dict[int, tuple[float, bool]] = {}
    for score, (index, _, _, right) in zip(scores, rows):
        if index not in best or score > best[index][0]:
            best[index] = (score, right)
    hits = {rel: [] for rel in dict.fromkeys(relations)}
    for index, (_, right) in sorted(best.items()):
        hits[relations[index]].append(right)
    every = [hit for rel_hits in hits.values() for hit in rel_hits]
    return {"choice": sum(every) / len(every), **{f"choice_{rel}": sum(h) / len(h) for rel, h in hits.items()}}


@torch.no_grad()
def text_loss(model, ids: torch.Tensor, seq: int) -> float:
    """Per-character loss of ``ids`` cut into consecutive windows of ``seq + 1`` (the tail shorter)."""
    total = count = 0.0
    for start in range(0, len(ids) - 1, seq):
        window = ids[start: start + seq + 1].unsqueeze(0)
        if window.shape[1] < 2:
            break
        n = window.shape[1] - 1
        total += float(model(input_ids=window, labels=window).loss) * n
        count += n
    return total / count


# Output paths, redraw mode and machine settings do not change the figures, so they stay out of the JSON.
_NOT_CONFIG = ("out", "plot", "plot_only", "threads", "device", "workers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHOD_ORDER))
    p.add_argument("--drugs", type=int, default=16, help="invented drugs, four facts each")
    p.add_argument("--world-seed", type=int, default=0, help="draws the drugs and their facts")
    p.add_argument("--steps", type=int, default=200, help="continual-pretraining steps of every run")
    p.add_argument("--merge-every", type=int, default=50, help="ReLoRA/ReMoRA restart period T")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--restart-warmup", type=int, default=8)
    p.add_argument("--batch", type=int, default=10, help="windows per step, replay included")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--replays", default="0,0.2", help="shares of each batch taken from the plays")
    p.add_argument("--r", type=int, default=8, help="LoRA rank; MoRA gets the same parameter count")
    p.add_argument("--lora-alpha-ratio", type=float, default=2.0, help="lora_alpha = ratio * r")
    p.add_argument("--lr-grid-peft", default="3e-3,1e-2,3e-2", help="learning rates tried for every adapter")
    p.add_argument("--lr-grid-full", default="3e-4,1e-3,3e-3", help="learning rates tried for full fine-tuning")
    p.add_argument("--sweep-extend", type=int, default=2,
                   help="times a grid may grow past its end while the best rate sits there")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the adapter init and the data order")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--old-windows", type=int, default=48, help="held-out plays windows of --seq characters")
    p.add_argument("--base-steps", type=int, default=600, help="full-rank pretraining of the base on the plays")
    p.add_argument("--base-batch", type=int, default=16)
    ev.add_model_args(p)
    p.add_argument("--workers", type=int, default=2, help="processes running the continual-pretraining runs")
    p.add_argument("--threads", type=int, default=2, help="threads of the base pretraining (runs use one each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ev.RESULTS_DIR / "cpt_compare.json"))
    p.add_argument("--plot", default=None, help="PNG prefix of the plots (default: --out without .json)")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNGs and print the table from an existing --out JSON")
    args = p.parse_args(argv)
    ev.check_schedule_args(p, args, METHOD_ORDER)
    for share in _floats(args.replays):
        if not 0 <= share < 1 or abs(share * args.batch - round(share * args.batch)) > 1e-9:
            p.error(f"--replays has {share}: each share must be in [0, 1) and a whole number of the "
                    f"--batch={args.batch} windows (e.g. --batch 10 for 0.2)")
    if args.drugs < 2:
        p.error(f"--drugs={args.drugs}: need at least 2 (every drug names another it must not be combined with)")
    if args.workers < 1:
        p.error(f"--workers={args.workers}: need at least 1")
    return args


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def methods(args) -> dict[str, ev.Method]:
    """Every method at learning rate 0 (the sweep sets it)."""
    table = {
        "full": ev.Method("full", "full"),
        "lora": ev.Method("lora", "lora", r=args.r),
        "mora1": ev.Method("mora1", "mora", r=args.r, type_cycle=(1,)),
        "mora6": ev.Method("mora6", "mora", r=args.r, type_cycle=(6,)),
        "relora": ev.Method("relora", "lora", r=args.r, merge_every=args.merge_every),
        "remora": ev.Method("remora", "mora", r=args.r, type_cycle=(1, 2), merge_every=args.merge_every),
    }
    return {name: table[name] for name in METHOD_ORDER if name in args.methods.split(",")}


class Data:
    """Everything a run reads, built the same way in every process."""

    def __init__(self, args) -> None:
        self.tok = ev.CharTokenizer()
        self.facts = make_world(args.drugs, args.world_seed)
        plays_train, plays_held = ev.split_corpus(self.tok.encode(ev.load_corpus()))
        self.plays_train = plays_train
        starts = torch.linspace(0, len(plays_held) - args.seq - 2, args.old_windows).long().tolist()
        self.old_windows = torch.stack([plays_held[s: s + args.seq + 1] for s in starts]).to(args.device)
        self.docs = training_documents(self.facts)
        self.probes = {}
        for name, phrasing in (("test", TEST), ("dev", DEV), ("seen", 0)):
            ids, spans = probe_batch(self.facts, phrasing, self.tok)
            self.probes[name] = ids.to(args.device), spans
        self.choices = {}
        for name, phrasing in (("test", TEST), ("seen", 0)):
            ids, rows = choice_batch(self.facts, phrasing, self.tok)
            self.choices[name] = ids.to(args.device), rows
        self.held_out = {name: self.tok.encode(held_out_text(self.facts, phrasing)).to(args.device)
                         for name, phrasing in (("test", TEST), ("dev", DEV))}

@torch.no_grad()
def old_loss(model, data: Data, batch: int) -> float:
    total = 0.0
    for i in range(0, len(data.old_windows), batch):
        chunk = data.old_windows[i: i + batch]
        total += float(model(input_ids=chunk, labels=chunk).loss) * len(chunk)
    return total / len(data.old_windows)


def evaluate(model, data: Data, args) -> dict[str, float]:
    was_training = model.training
    model.eval()
    metrics = {"old_loss": old_loss(model, data, args.batch)}
    for split in ("test", "dev"):
        metrics[f"{split}_loss"] = text_loss(model, data.held_out[split], args.seq)
    for split, (ids, spans) in data.probes.items():
        for key, value in probe_accuracy(model, ids, spans, [f.relation for f in data.facts]).items():
            metrics[f"{split}_{key}"] = value
    model.train(was_training)
    return metrics


def evaluate_choices(model, data: Data) -> dict[str, float]:
    """The choice probe in the test and a training phrasing (once, at the end of a run: it ranks some 750
    sentences per phrasing, as costly as 20 training steps)."""
    was_training = model.training
    model.eval()
    relations = [f.relation for f in data.facts]
    metrics = {f"{split}_{key}": value for split, (ids, rows) in data.choices.items()
               for key, value in choice_accuracy(model, ids, rows, relations).items()}
    model.train(was_training)
    return metrics


def pretrain_base(args, data: Data) -> dict[str, torch.Tensor]:
    """Full-rank pretraining on the plays (seed 0): the base every run continues from."""
    ev.setup_determinism(0, args.threads)
    model = ev.build_model(ev.model_size(args, args.seq), data.tok.vocab_size, 0, args.device)
    gen = torch.Generator().manual_seed(1)

    def batch_fn(step):
        starts = torch.randint(0, len(data.plays_train) - args.seq - 1, (args.base_batch,), generator=gen)
        x = torch.stack([data.plays_train[s: s + args.seq] for s in starts.tolist()]).to(args.device)
        return x, x

    steps = args.base_steps
    ev.train(model, ev.Method("full", "full", lr=2e-3), steps=steps, warmup=max(1, steps // 10), restart_warmup=0,
             batch_fn=batch_fn, eval_fn=lambda m: {}, eval_every=steps + 1)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def make_batch_fn(new_ids: torch.Tensor, old_ids: torch.Tensor, *, batch: int, seq: int, replay: float, seed: int,
                  device: str = "cpu"):
    """``step -> (x, x)``, ``x`` of ``(batch, seq)``: random windows of the new-domain stream, the last
    ``round(replay * batch)`` rows from the plays (replay)."""
    n_old = round(replay * batch)
    gen = torch.Generator().manual_seed(40_000 + seed)

    def windows(ids, count):
        starts = torch.randint(0, len(ids) - seq - 1, (count,), generator=gen).tolist()
        return [ids[s: s + seq] for s in starts]

    def batch_fn(step):
        x = torch.stack(windows(new_ids, batch - n_old) + windows(old_ids, n_old)).to(device)
        return x, x

    return batch_fn


_WORKER: dict = {}


def _init_worker(args, base_state) -> None:
    _WORKER.update(args=args, base=base_state, data=Data(args))


def _run(job: tuple[str, float, int, float]) -> dict:
    """One continual-pretraining run ``(method, lr, seed, replay share)`` in this worker, one thread."""
    name, lr, seed, replay = job
    args, data = _WORKER["args"], _WORKER["data"]
    method = replace(methods(args)[name], lr=lr)
    ev.setup_determinism(seed, 1 if args.device == "cpu" else 0)
    model = ev.build_model(ev.model_size(args, args.seq), data.tok.vocab_size, 0, args.device)
    model.load_state_dict(_WORKER["base"])
    torch.manual_seed(seed)  # the adapter initialisation (LoRA A) depends on the seed, the base does not
    ev.attach(model, method, lora_alpha=args.lora_alpha_ratio * args.r, train_rest=None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch_fn = make_batch_fn(data.tok.encode(stream(data.docs, seed)), data.plays_train, batch=args.batch,
                             seq=args.seq, replay=replay, seed=seed, device=args.device)
    t0 = time.perf_counter()
    history = ev.train(model, method, steps=args.steps, warmup=args.warmup, restart_warmup=args.restart_warmup,
                       batch_fn=batch_fn, eval_fn=lambda m: evaluate(m, data, args), eval_every=args.eval_every)
    history["eval"][-1].update(evaluate_choices(model, data))
    return {"trainable_params": trainable, "adapter_params": ev.adapter_parameter_count(model),
            "r_hat": ev.mora_r_hats(model) if method.kind == "mora" else {},
            "eval": history["eval"], "restarts": [r["step"] for r in history["restarts"]],
            "_seconds": time.perf_counter() - t0}


@contextmanager
def runner(args, base_state):
    """``jobs -> results`` in order, from ``--workers`` spawned processes kept for the whole run (or this
    process for 1 worker)."""
    if args.workers == 1:
        _init_worker(args, base_state)
        yield lambda jobs: [_run(job) for job in jobs]
        return
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(args, base_state)) as pool:
        yield lambda jobs: list(pool.map(_run, jobs))


def choose_lr(sweep: dict[str, dict]) -> float:
    """Best final development-phrasing character accuracy; a tie goes to the lower development loss."""
    best = max(sweep.items(), key=lambda kv: (round(kv[1]["dev_char_acc"], 6), -kv[1]["dev_loss"]))
    return float(best[0])


def next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 ladder (``3e-3 -> 1e-2``, ``1e-2 -> 3e-2``; down alike); other
    values move by a factor 3."""
    mantissa = f"{lr:.1e}"[:3]
    factor = {"1.0": (3.0, 1 / 3.333333), "3.0": (3.333333, 1 / 3.0)}.get(mantissa, (3.0, 1 / 3.0))
    return float(f"{lr * factor[0 if up else 1]:.2g}")


def sweep_learning_rates(table: dict, grids: dict[str, list[float]], seed: int, run, extend: int) -> dict:
    """Runs of every method at every grid learning rate (``seed``, no replay). While a method's best rate
    (:func:`choose_lr`) sits at an end of what it has tried, the grid grows by one step past that end, at most
    ``extend`` times. Returns ``{(name, lr, seed, 0.0): run}``."""
    runs: dict = {}
    todo = {name: list(grid) for name, grid in grids.items()}
    for _ in range(extend + 1):
        jobs = [(name, lr, seed, 0.0) for name, lrs in todo.items() for lr in lrs]
        if not jobs:
            break
        runs.update(zip(jobs, run(jobs)))
        todo = {}
        for name in table:
            tried = sorted(lr for (n, lr, _, _) in runs if n == name)
            best = choose_lr({lr: runs[(name, lr, seed, 0.0)]["eval"][-1] for lr in tried})
            if len(tried) > 1 and best in (tried[0], tried[-1]):
                todo[name] = [next_lr(best, up=best == tried[-1])]
    return runs


def summarise(runs: list[dict], base: dict) -> dict:
    """Means over seeds of every evaluation (``curve``) and of the final one (which adds the choice probe),
    the seed range of each final figure; forgetting = final old-domain loss - the base's."""
    steps = [e["step"] for e in runs[0]["eval"]]
    keys = [k for k in runs[0]["eval"][0] if k != "step"]
    curve = {k: [sum(r["eval"][i][k] for r in runs) / len(runs) for i in range(len(steps))] for k in keys}
    finals = [r["eval"][-1] for r in runs]
    final_keys = [k for k in finals[0] if k != "step"]
    forgetting = [f["old_loss"] - base["old_loss"] for f in finals]
    spread = {k: [min(f[k] for f in finals), max(f[k] for f in finals)] for k in final_keys}
    return {"steps": steps, "curve": curve, "final": {k: sum(f[k] for f in finals) / len(finals) for k in final_keys},
            "forgetting": sum(forgetting) / len(forgetting), "forgetting_per_seed": forgetting,
            "range": spread, "per_seed_final": finals}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    prefix = Path(args.plot) if args.plot else out.with_suffix("")
    if args.plot_only:
        result = json.loads(out.read_text(encoding="utf-8"))
        plot(result, prefix)
        print(markdown_table(result))
        return result
    data = Data(args)
    seconds = {}
    t0 = time.perf_counter()
    base_state = pretrain_base(args, data)
    seconds["base"] = time.perf_counter() - t0
    _init_worker(args, base_state)
    base_model = ev.build_model(ev.model_size(args, args.seq), data.tok.vocab_size, 0, args.device)
    base_model.load_state_dict(base_state)
    base = {**evaluate(base_model, data, args), **evaluate_choices(base_model, data)}
    print(f"base: old-domain loss {base['old_loss']:.3f}, new-domain loss {base['test_loss']:.3f} "
          f"({seconds['base']:.0f}s)", flush=True)

    table = methods(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    replays = _floats(args.replays)
    grids = {name: _floats(args.lr_grid_full if m.kind == "full" else args.lr_grid_peft) for name, m in table.items()}
    with runner(args, base_state) as run:
        t0 = time.perf_counter()
        sweep_runs = sweep_learning_rates(table, grids, seeds[0], run, args.sweep_extend)
        seconds["sweep"] = time.perf_counter() - t0
        sweep, chosen = {}, {}
        for name in table:
            tried = sorted(lr for (n, lr, _, _) in sweep_runs if n == name)
            finals = {lr: sweep_runs[(name, lr, seeds[0], 0.0)]["eval"][-1] for lr in tried}
            sweep[name] = {f"{lr:g}": {**f, "forgetting": f["old_loss"] - base["old_loss"]}
                           for lr, f in finals.items()}
            chosen[name] = choose_lr(finals)
            print(f"sweep {name:7s} " + " ".join(f"lr={lr}: dev char {100 * v['dev_char_acc']:.1f}%"
                                                    for lr, v in sweep[name].items()) + f" -> {chosen[name]:g}",
                  flush=True)
        t0 = time.perf_counter()
        jobs = [(name, chosen[name], seed, share) for share in replays for name in table for seed in seeds]
        todo = [job for job in jobs if job not in sweep_runs]
        runs = {**sweep_runs, **dict(zip(todo, run(todo)))}
        seconds["final"] = time.perf_counter() - t0
    result = {"config": {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG},
              "world": {"facts": len(data.facts), "train_chars": sum(len(d) + 2 for d in data.docs),
                        "example_document": data.docs[0],
                        "phrasings": {rel: {"train": list(t[:TRAIN_PHRASINGS]), "dev": t[DEV], "test": t[TEST]}
                                      for rel, t in TEMPLATES.items()}},
              "base": base, "sweep": sweep, "lr": chosen, "results": {}}
    result["config"]["model"] = ev.size_dict(ev.model_size(args, args.seq))
    result["config"]["budget_per_shape"] = ev.lora_budget_table(ev.model_size(args, args.seq), args.r, 1)
    seconds["runs"] = {}
    for share in replays:
        key = f"replay {share:g}"
        result["results"][key] = {}
        for name in table:
            per_seed = [runs[(name, chosen[name], seed, share)] for seed in seeds]
            seconds["runs"][f"{key} {name}"] = sum(r.pop("_seconds", 0.0) for r in per_seed)
            first = per_seed[0]
            result["results"][key][name] = {
                "lr": chosen[name], "trainable_params": first["trainable_params"],
                "adapter_params": first["adapter_params"], "r_hat": first["r_hat"], "restarts": first["restarts"],
                **summarise(per_seed, base)}
    for run in sweep_runs.values():
        run.pop("_seconds", None)
    ev.write_json(out, result, volatile={"machine": ev.machine(), "seconds": seconds, "workers": args.workers})
    plot(result, prefix)
    print(markdown_table(result))
    return result


def plot(result: dict, prefix: Path) -> None:
    """``<prefix>_probe.png``: test-phrasing character accuracy over steps per replay share;
    ``<prefix>_tradeoff.png``: forgetting against knowledge, one point per method and share (bars: seed range)."""
    plt = ev.plot_setup()
    shares = list(result["results"])
    fig, axes = plt.subplots(1, len(shares), figsize=(4.5 * len(shares), 3.4), sharey=True, squeeze=False)
    for ax, share in zip(axes[0], shares):
        for name, res in result["results"][share].items():
            ax.plot(res["steps"], [100 * a for a in res["curve"]["test_char_acc"]], label=name,
                    color=COLORS[name], lw=1.2)
        ax.set(xlabel="step", title=f"held-out phrasing, {share}")
    axes[0][0].set_ylabel("answer character accuracy % (mean of seeds)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    cfg = result["config"]
    fig.suptitle(f"Continual pretraining on {result['world']['facts']} invented facts, LoRA r={cfg['r']} budget",
                 fontsize=10, y=1.02)
    fig.savefig(f"{prefix}_probe.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for share, marker in zip(shares, "os^"):
        for name, res in result["results"][share].items():
            lo, hi = res["range"]["test_char_acc"]
            f_lo, f_hi = min(res["forgetting_per_seed"]), max(res["forgetting_per_seed"])
            x, y = res["forgetting"], 100 * res["final"]["test_char_acc"]
            ax.errorbar([x], [y], xerr=[[x - f_lo], [f_hi - x]], yerr=[[y - 100 * lo], [100 * hi - y]], fmt=marker,
                        color=COLORS[name], ms=5, lw=0.8,
                        label=f"{name}, {share}")
    ax.set(xlabel="forgetting: old-domain loss - base (nats/char)",
           ylabel="held-out phrasing char accuracy %", title="knowledge vs forgetting (final)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(f"{prefix}_tradeoff.png", dpi=90)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    chance = {rel: 1 / len(pool) for rel, pool in candidates(make_world(result["config"]["drugs"],
                                                                          result["config"]["world_seed"])).items()}
    chance["interaction"] = 1 / (result["config"]["drugs"] - 1)
    lines = [f"base: old-domain loss {result['base']['old_loss']:.3f}, test-phrasing char acc "
             f"{100 * result['base']['test_char_acc']:.1f} %, choice {100 * result['base']['test_choice']:.1f} %; "
             "choice by chance: " + " / ".join(f"{100 * chance[rel]:.0f}" for rel in RELATIONS),
             "| replay | method | lr | trainable | probe char % | probe exact % "
             "| choice % target / dose / indication / interaction | seen exact % | seen choice % | new-domain loss "
             "| forgetting |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for share, table in result["results"].items():
        for name, res in table.items():
            f = res["final"]
            grid = sorted(float(lr) for lr in result["sweep"][name])
            edge = "*" if len(grid) > 1 and res["lr"] in (grid[0], grid[-1]) else ""
            by_relation = " / ".join(f"{100 * f[f'test_choice_{rel}']:.0f}" for rel in RELATIONS)
            lines.append(f"| {share.split()[1]} | {name} | {res['lr']:g}{edge} | {res['trainable_params']:,} | "
                         f"{100 * f['test_char_acc']:.1f} | {100 * f['test_exact']:.1f} | {by_relation} | "
                         f"{100 * f['seen_exact']:.1f} | {100 * f['seen_choice']:.1f} | {f['test_loss']:.3f} | "
                         f"{res['forgetting']:+.3f} |")
    lines.append("lr*: the best learning rate is at an end of its grid (the optimum may lie beyond it)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
