"""Attribution patching (AtP) vs activation patching (AP); definitions: docs/interpretability.md.

On clean/corrupted prompt pairs with metric M = logit(correct) - logit(wrong) at the last position:
    AP(a)  = M(corrupted, a set to its clean value) - M(corrupted)            one forward per node
    AtP(a) = (a_clean - a_corrupted) . dM/da  at the corrupted run            one backward for all nodes
both divided by M(clean) - M(corrupted) per prompt (1 = full recovery). Nodes: the residual stream at the input
of every block and of the final norm, per (layer, position); and every head's output (all positions).
If the map from a node to M is affine (norms frozen, attention pattern fixed, linear MLPs), AtP == AP exactly;
the paper's finding is that on real models removing LayerNorm does not make AtP markedly more accurate, the
remaining error coming from attention softmax and GELU.

Tasks: induction on repeated random tokens (which 2-layer models learn; needs no special tokenizer), an IOI
prompt generator for GPT-2 tokenizers, and two tasks of the data=synthetic control: the back-copy (the corruption
changes the copied token; the copy head keeps attending to the previous position) and the trigger switch (the
corruption replaces the trigger by an ordinary token: the copy heads move their attention from the previous
token to BOS, `attention_shift` measures it). Works on a model of any supported family (HF exports, the removable
model): the family adapter (lnfree.families) names the blocks, the final norm and each attention output projection.

Agreement of AtP with AP is measured on the live nodes only: a residual node at a position before the first one
where the two prompts differ is exactly 0 in both (causal attention), and counting those zeros inflates Pearson.
Reported: Pearson, Spearman, NMAE, the least-squares scale of AtP against AP (AtP ~ scale * AP) and the NMAE of
AtP / scale (what is left once the scale is fitted). `compare(..., freeze=True)` runs everything with every norm
frozen at its clean-run scale (`frozen.py`): the frozen-LN arm.

    python -m lnfree.analysis.interp.patching [name=path ...]    -> experiments/interp/synth_w64/patching.{json,png}
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ...families import family
from .frozen import norms_frozen_at


# -- tasks -----------------------------------------------------------------------------------------------
def induction_pairs(vocab_size: int, n: int, half: int = 10, seed: int = 0, low: int = 1, bos: int | None = None):
    """Random tokens A (length `half`, ids in [low, vocab_size)) then A again without its last token: the answer at
    the last position is A[-1] by induction. The corrupted prompt changes A[-1] in the first half to B, so
    induction says B. With `bos`, every prompt starts with that token (for models trained with one).
    Returns clean, corrupted [n, 2*half-1 (+1)] and correct, wrong [n] token ids."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(low, vocab_size, (n, half), generator=g)
    b = torch.randint(low, vocab_size, (n,), generator=g)
    b = torch.where(b == a[:, -1], (b - low + 1) % (vocab_size - low) + low, b)  # B != A[-1]
    clean = torch.cat([a, a[:, :-1]], dim=1)
    corrupt = clean.clone()
    corrupt[:, half - 1] = b
    if bos is not None:
        clean, corrupt = (torch.cat([torch.full((n, 1), bos), x], dim=1) for x in (clean, corrupt))
    return clean, corrupt, a[:, -1].clone(), b


def backcopy_pairs(task, n: int, length: int = 32, seed: int = 0, bos: int = 0):
    """The Bigram-Backcopy task's copy (lnfree/data/synthetic.py; what data=synthetic models learn): BOS, a chain
    of `length` - 3 task tokens, a non-trigger token a, a trigger; the answer after a trigger is the token before it,
    a. The corrupted prompt has b instead of a (both non-triggers), so the copy says b. `task`: a BigramBackcopy.
    Returns clean, corrupted [n, length] and correct, wrong [n] token ids."""
    rng = np.random.default_rng(seed)
    k, lo = task.n_triggers, task.low
    clean, corrupt, correct, wrong = [], [], [], []
    for _ in range(n):
        prefix = task.sequence(rng, length - 3)
        while prefix[-1] < k:  # a prefix ending in a trigger would make a a copy target itself
            prefix = task.sequence(rng, length - 3)
        prefix = (prefix + lo).tolist()
        a, b = (rng.choice(np.arange(k, task.vocab), 2, replace=False) + lo).tolist()
        trigger = int(rng.integers(0, k)) + lo
        clean.append([bos, *prefix, a, trigger])
        corrupt.append([bos, *prefix, b, trigger])
        correct.append(a)
        wrong.append(b)
    return torch.tensor(clean), torch.tensor(corrupt), torch.tensor(correct), torch.tensor(wrong)


def switch_pairs(task, n: int, length: int = 32, seed: int = 0, bos: int = 0, max_prob: float = 0.01):
    """The trigger switch of the Bigram-Backcopy task: clean = BOS, a chain of `length` - 3 task tokens, a
    non-trigger a, a trigger (answer: a, copied); corrupted = the same with the trigger replaced by an ordinary
    token x (answer: x's most likely bigram successor c, never a). Only the last token differs, and it is the query
    position: the copy heads attend to the previous token from a trigger and park on BOS from any other token, so
    the corruption moves their attention. x is drawn among the tokens after which a is unlikely (bigram probability
    below `max_prob`), so that the corrupted prompt does not ask for a. Metric: logit(a) - logit(c).
    Returns clean, corrupted [n, length] and correct, wrong [n] token ids."""
    rng = np.random.default_rng(seed)
    k, lo = task.n_triggers, task.low
    clean, corrupt, correct, wrong = [], [], [], []
    while len(clean) < n:
        prefix = task.sequence(rng, length - 3)
        if prefix[-1] < k:
            continue
        a = int(rng.integers(k, task.vocab))
        options = [x for x in range(k, task.vocab) if task.transition[x - k, a - k] < max_prob]
        x = int(rng.choice(options))
        row = task.transition[x - k].copy()
        row[a - k] = -1
        c = int(np.argmax(row)) + k
        trigger = int(rng.integers(0, k))
        head = [bos, *(prefix + lo).tolist(), a + lo]
        clean.append([*head, trigger + lo])
        corrupt.append([*head, x + lo])
        correct.append(a + lo)
        wrong.append(c + lo)
    return torch.tensor(clean), torch.tensor(corrupt), torch.tensor(correct), torch.tensor(wrong)


@torch.no_grad()
def attention_shift(model, clean, corrupt) -> dict:
    """How far the corruption moves each head's attention at the last query (the one the metric reads):
    total-variation distance between its clean and corrupted attention rows, mean over prompts [L, H], and the
    attention to BOS (key 0) and to the previous token, clean and corrupted [L, H]."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are only materialised by eager attention
    try:
        a_c = model(input_ids=clean, output_attentions=True).attentions  # L x [n, H, t, t]
        a_x = model(input_ids=corrupt, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    rows_c = torch.stack([a[:, :, -1] for a in a_c], 1).float()  # [n, L, H, t]
    rows_x = torch.stack([a[:, :, -1] for a in a_x], 1).float()
    return {"tv": (rows_c - rows_x).abs().sum(-1).mean(0).div(2).tolist(),
            "bos_clean": rows_c[..., 0].mean(0).tolist(), "bos_corrupted": rows_x[..., 0].mean(0).tolist(),
            "prev_clean": rows_c[..., -2].mean(0).tolist(), "prev_corrupted": rows_x[..., -2].mean(0).tolist()}


SYNTHETIC_TASKS = {"backcopy": backcopy_pairs, "switch": switch_pairs}  # the data=synthetic control's tasks

IOI_NAMES = ["Jamie", "Erin", "John", "Mary", "Tom", "James", "Dan", "Sid", "Kate", "Anne", "Paul", "Alex", "Rose",
             "Sarah", "Mike", "Lisa", "David", "Emma", "Chris", "Laura"]
IOI_TEMPLATES = ["Then, {A} and {B} went to the house. {B} gave a bone to", "When {A} and {B} got a drink at the bar,"
                 " {B} decided to give it to", "After {A} and {B} went to the store, {B} gave a book to"]


def ioi_pairs(tokenizer, n: int, seed: int = 0):
    """IOI prompts for GPT-2-style tokenizers: clean '...{A} and {B}... {B} gave ... to' (answer ' A', wrong ' B'),
    corrupted with the second B replaced by a third name C. Names that are not one token are skipped; prompts of a
    template tokenize to the same length. Returns clean, corrupted [n, t] and correct, wrong [n]."""
    rng = np.random.default_rng(seed)
    names = [x for x in IOI_NAMES if len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) == 1]
    if len(names) < 3:
        raise ValueError(f"the tokenizer has fewer than 3 single-token names among {IOI_NAMES}")
    template = IOI_TEMPLATES[0]
    clean, corrupt, correct, wrong = [], [], [], []
    for _ in range(n):
        a, b, c = rng.choice(names, 3, replace=False)
        head, _, tail = template.partition("{B} gave")
        clean.append(tokenizer(template.format(A=a, B=b), add_special_tokens=False)["input_ids"])
        corrupt.append(tokenizer(head.format(A=a, B=b) + f"{c} gave" + tail, add_special_tokens=False)["input_ids"])
        correct.append(tokenizer(" " + a, add_special_tokens=False)["input_ids"][0])
        wrong.append(tokenizer(" " + b, add_special_tokens=False)["input_ids"][0])
    return torch.tensor(clean), torch.tensor(corrupt), torch.tensor(correct), torch.tensor(wrong)


# -- nodes and hooks -------------------------------------------------------------------------------------
def _resid_modules(model):
    """The modules whose input is the residual stream: every block, then the final norm. [L+1]"""
    fam = family(model.config)
    return [*fam.blocks(model), fam.final_norm(model)]


def _head_readers(model):
    """Each block's attention output projection, whose input is every head's output side by side. [L]"""
    fam = family(model.config)
    return [fam.attn_out(block)[0] for block in fam.blocks(model)]


def _shape(model):
    """(layers, heads, head width) of the model; the heads' outputs are the output projection's input."""
    fam = family(model.config)
    n_head, blocks = fam.dims(model.config).n_head, fam.blocks(model)
    return len(blocks), n_head, fam.attn_out(blocks[0])[1].shape[0] // n_head


@contextlib.contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def metric(model, ids, correct, wrong) -> torch.Tensor:
    """Logit difference correct - wrong at the last position, per prompt [n]."""
    logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]  # the unembedding of the last position only
    return logits.gather(1, correct[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0]


def capture(model, ids, grad: bool = False):
    """Residual inputs {layer: [n, t, d]} and inputs of the attention output projection (the heads' outputs)
    {layer: [n, t, d]} of one forward (and, with grad=True, tensors that keep their gradients)."""
    resid, z, handles = {}, {}, []
    for layer, m in enumerate(_resid_modules(model)):
        def pre(mod, args, kwargs=None, layer=layer):
            x = args[0]
            if grad:
                x.retain_grad()
            resid[layer] = x
        handles.append(m.register_forward_pre_hook(pre))
    for layer, proj in enumerate(_head_readers(model)):
        def zpre(mod, args, layer=layer):
            x = args[0]
            if grad:
                x.retain_grad()
            z[layer] = x
        handles.append(proj.register_forward_pre_hook(zpre))
    return resid, z, handles


def attribution_patching(model, clean, corrupt, correct, wrong):
    """AtP for every node: resid [n, L+1, t] and heads [n, L, H] (unnormalised)."""
    with torch.no_grad(), _hooks((c := capture(model, clean))[2]):
        metric(model, clean, correct, wrong)
    resid_c, z_c = c[0], c[1]
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        for p in trainable:  # gradients for the activations only
            p.requires_grad_(False)
        resid_x, z_x, handles = capture(model, corrupt, grad=True)
        with _hooks(handles):
            # embeddings must require grad for the block-0 input to carry one
            emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            with _hooks([emb]):
                m = metric(model, corrupt, correct, wrong)
                m.sum().backward()
    for p in trainable:
        p.requires_grad_(True)
    n_layer, n_head, d_head = _shape(model)
    resid = torch.stack([((resid_c[layer] - resid_x[layer].detach()) * resid_x[layer].grad).sum(-1)
                         for layer in range(n_layer + 1)], dim=1)
    heads = torch.stack([((z_c[layer] - z_x[layer].detach()) * z_x[layer].grad)
                         .reshape(*z_c[layer].shape[:2], n_head, d_head).sum((1, 3))
                         for layer in range(n_layer)], dim=1)
    return resid.detach(), heads.detach()


@torch.no_grad()
def activation_patching(model, clean, corrupt, correct, wrong):
    """AP for every node: resid [n, L+1, t] and heads [n, L, H] (unnormalised)."""
    resid_c, z_c, handles = capture(model, clean)
    with _hooks(handles):
        metric(model, clean, correct, wrong)
    base = metric(model, corrupt, correct, wrong)
    (n_layer, n_head, d_head), t = _shape(model), clean.shape[1]
    resid = torch.zeros(len(clean), n_layer + 1, t)
    for layer, mod in enumerate(_resid_modules(model)):
        for p in range(t):
            def patch(m, args, layer=layer, p=p):
                x = args[0].clone()
                x[:, p] = resid_c[layer][:, p]
                return (x, *args[1:])
            with _hooks([mod.register_forward_pre_hook(patch)]):
                resid[:, layer, p] = metric(model, corrupt, correct, wrong) - base
    heads = torch.zeros(len(clean), n_layer, n_head)
    for layer, proj in enumerate(_head_readers(model)):
        for h in range(n_head):
            sl = slice(h * d_head, (h + 1) * d_head)

            def patch(m, args, layer=layer, sl=sl):
                x = args[0].clone()
                x[..., sl] = z_c[layer][..., sl]
                return (x, *args[1:])
            with _hooks([proj.register_forward_pre_hook(patch)]):
                heads[:, layer, h] = metric(model, corrupt, correct, wrong) - base
    return resid, heads


AGREEMENT = ("pearson", "spearman", "nmae_percent", "scale", "nmae_scaled_percent")


def agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """AGREEMENT between prompt-mean AP (a) and AtP (b) node vectors, for any batch of them: a, b [..., node] ->
    [..., 5]: Pearson, Spearman, NMAE (%), the least-squares scale of b against a through 0 and the NMAE (%) of
    b / scale."""
    from scipy import stats as sps

    def pearson(x, y):
        x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
        return (x * y).sum(-1) / np.sqrt((x ** 2).sum(-1) * (y ** 2).sum(-1))

    spearman = pearson(sps.rankdata(a, axis=-1), sps.rankdata(b, axis=-1))
    def nmae(x, y):
        return np.abs(x - y).mean(-1) / np.maximum(np.abs(x).mean(-1), 1e-30) * 100

    scale = (a * b).sum(-1) / np.maximum((a * a).sum(-1), 1e-30)
    scaled = b / np.where(np.abs(scale) > 1e-30, scale, 1e-30)[..., None]
    return np.stack([pearson(a, b), spearman, nmae(a, b), scale, nmae(a, scaled)], -1)


def agreement_ci(ap: np.ndarray, atp: np.ndarray, n_boot: int = 1000, seed: int = 0):
    """agreement() of per-prompt AP and AtP [prompt, node] and its 95% percentile bootstrap CIs over prompts
    (whole prompts, AP and AtP together: the nodes of one prompt are correlated). Tested coverage on simulated
    prompts: docs/statistics.md. Returns the AGREEMENT values and their [low, high]."""
    from ..metrics import percentile_ci, resample_counts

    w = resample_counts(len(ap), n_boot, seed) / len(ap)  # [n_boot, prompt]: each resample's weights
    boots = agreement(w @ ap, w @ atp)  # [n_boot, len(AGREEMENT)]
    point = agreement(ap.mean(0), atp.mean(0))
    return [float(v) for v in point], [percentile_ci(boots[:, k]) for k in range(len(AGREEMENT))]


def compare(model, clean, corrupt, correct, wrong, n_boot: int = 1000, seed: int = 0, freeze: bool = False) -> dict:
    """AP and AtP normalised by M(clean) - M(corrupted), their agreement (AGREEMENT) over the prompt-mean live
    nodes, with bootstrap CIs over prompts. freeze=True: the frozen-LN arm (every norm at its clean-run scale)."""
    model.eval()
    with norms_frozen_at(model, clean) if freeze else contextlib.nullcontext():
        with torch.no_grad():
            m_clean, m_corr = metric(model, clean, correct, wrong), metric(model, corrupt, correct, wrong)
        ap_r, ap_h = activation_patching(model, clean, corrupt, correct, wrong)
        atp_r, atp_h = attribution_patching(model, clean, corrupt, correct, wrong)
    denom = (m_clean - m_corr)[:, None, None]
    ap = torch.cat([(ap_r / denom).flatten(1), (ap_h / denom).flatten(1)], 1).double().numpy()  # [n, nodes]
    atp = torch.cat([(atp_r / denom).flatten(1), (atp_h / denom).flatten(1)], 1).double().numpy()
    # live nodes: residual positions from the first one where any pair differs on, and every head
    first = int((clean != corrupt).any(0).float().argmax())
    live_resid = (torch.arange(ap_r.shape[2]) >= first).expand(ap_r.shape[1:]).flatten()
    live = torch.cat([live_resid, torch.ones(ap_h[0].numel(), dtype=torch.bool)]).numpy()

    point, ci = agreement_ci(ap[:, live], atp[:, live], n_boot, seed)
    n_resid = ap_r[0].numel()
    return {"clean_logit_diff": float(m_clean.mean()), "corrupted_logit_diff": float(m_corr.mean()),
            "clean_positive_fraction": float((m_clean > 0).float().mean()), "n_prompts": len(clean),
            "frozen_ln": freeze, "first_differing_position": first, "n_live_nodes": int(live.sum()),
            **{k: point[i] for i, k in enumerate(AGREEMENT)},
            **{f"{k.removesuffix('_percent')}_ci95": ci[i] for i, k in enumerate(AGREEMENT)},
            "ap_resid": ap[:, :n_resid].mean(0).reshape(ap_r.shape[1:]).tolist(),
            "atp_resid": atp[:, :n_resid].mean(0).reshape(ap_r.shape[1:]).tolist(),
            "ap_heads": ap[:, n_resid:].mean(0).reshape(ap_h.shape[1:]).tolist(),
            "atp_heads": atp[:, n_resid:].mean(0).reshape(ap_h.shape[1:]).tolist()}


def main(argv=None):
    from ...data.synthetic import BigramBackcopy
    from ...records import output_dir
    from .cli import add_prompt_args, each_model, parser, synthetic_task, write_result

    p = parser("attribution patching vs activation patching", "experiments/interp/synth_w64")
    p.add_argument("--task", choices=["induction", "backcopy", "switch"], default="induction",
                   help="backcopy, switch: the data=synthetic task (need --synthetic)")
    add_prompt_args(p)
    p.add_argument("--half", type=int, default=10, help="induction: length of the repeated random sequence")
    p.add_argument("--min-clean-diff", type=float, default=1.0, help="refuse a task the model does not solve")
    p.add_argument("--synthetic", action="store_true", help="models trained on data=synthetic: BOS first, tokens "
                   "from the task's ids")
    a = p.parse_args(argv)
    if a.task in SYNTHETIC_TASKS and not a.synthetic:
        p.error(f"--task {a.task} is a data=synthetic task: add --synthetic")
    out, res = output_dir(a.out, "interp/patching"), {}
    for name, path, model, tok in each_model(a.models):
        if a.synthetic:
            task = BigramBackcopy(**synthetic_task()[0])
            kw = {"low": task.low + task.n_triggers, "bos": tok.eos_token_id}
            high = task.low + task.vocab
        else:
            kw, high = {}, model.config.vocab_size
        if a.task in SYNTHETIC_TASKS:
            clean, corrupt, correct, wrong = SYNTHETIC_TASKS[a.task](task, a.prompts, a.length, bos=tok.eos_token_id)
        else:
            clean, corrupt, correct, wrong = induction_pairs(high, a.prompts, a.half, **kw)
        r = compare(model, clean, corrupt, correct, wrong)
        if not r["clean_logit_diff"] > a.min_clean_diff:
            raise SystemExit(f"{name}: mean clean logit difference {r['clean_logit_diff']:.2f} <= {a.min_clean_diff}:"
                             f" the model does not solve the {a.task} task, so patching it measures nothing")
        res[name] = {"path": path, **r}
        print(f"{name:10s} clean M {r['clean_logit_diff']:.2f} (positive in {100 * r['clean_positive_fraction']:.0f}%),"
              f" corrupted {r['corrupted_logit_diff']:.2f}; AtP vs AP: Pearson {r['pearson']:.3f} "
              f"[{r['pearson_ci95'][0]:.3f}, {r['pearson_ci95'][1]:.3f}], NMAE {r['nmae_percent']:.1f}% "
              f"[{r['nmae_ci95'][0]:.1f}, {r['nmae_ci95'][1]:.1f}]")
    meta = {"task": a.task, "half": a.half, "length": a.length, "synthetic": a.synthetic}
    write_result(out, "patching", {**meta, "models": res}, lambda record, path: _plot(res, path, a.task))


def _plot(res, path, task):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(res), figsize=(4.5 * len(res), 5), squeeze=False)
    for j, (name, r) in enumerate(res.items()):
        for i, key in enumerate(("ap_resid", "atp_resid")):
            grid = np.asarray(r[key])
            v = np.abs(grid).max()
            axes[i][j].imshow(grid, cmap="RdBu", vmin=-v, vmax=v, aspect="auto")
            axes[i][j].set(title=f"{name}: {'AP' if i == 0 else 'AtP'} (resid, normalised)", xlabel="position",
                           ylabel="block input (last: ln_f)")
    fig.suptitle(f"Activation vs attribution patching, {task} task", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
