"""Pretrain a small GPT: the project's main job.

    python -m experiments.pretrain_gpt                          # the Python stdlib's own source
    python -m experiments.pretrain_gpt --data input.txt         # any text file, char-level
    python -m experiments.pretrain_gpt --resume                 # continue from out_dir's latest
    python -m experiments.pretrain_gpt --compile                # the same run, one compiled step
    torchrun --nproc-per-node 2 -m experiments.pretrain_gpt --mesh dp=2           # data parallel
    torchrun --nproc-per-node 4 -m experiments.pretrain_gpt --mesh dp=2,tp=2 --fsdp
    torchrun --nproc-per-node 2 -m experiments.pretrain_gpt --mesh pp=2           # pipeline
    torchrun --nproc-per-node 4 -m experiments.pretrain_gpt --mesh dp=2,pp=2

Under torchrun, ``--mesh`` names the device mesh and ``--rules`` maps logical axes to its axes
(by default ``batch`` to ``dp``, and ``heads``, ``kv_heads``, ``mlp``, ``vocab`` to ``tp``, for
the axes the mesh has); ``--fsdp`` stores params sharded over ``dp`` (``--param-rules
embed=dp``). Every rank draws the same batches and keeps its shard; the run is otherwise
unchanged (rank 0 logs, plots, samples and writes gathered checkpoints). A ``pp`` axis runs
the model's own stages (``GPT.stages``) as a pipeline of ``--microbatches`` per step
(``--schedule 1f1b`` or ``gpipe``); its checkpoints hold the gathered params.

With no arguments it trains on a corpus every machine has: the ``.py`` files of the running
Python's standard library (tests excluded; every k-th file in sorted order, k chosen to keep
about ``--corpus-mb`` MB), code generation being one of the article's applications. Any
``--data FILE`` is read as UTF-8 text instead. The first 90 % of the tokens train, the last
10 % validate; the stdlib corpus is ordered so that its last tenth is every tenth file, from
all over the library.

The defaults are nanoGPT's published CPU config for ``shakespeare_char``: 4 layers, 4 heads,
d 128, block 64, batch 12, 2000 iterations, AdamW lr 1e-3 cosine to 1e-4 after 100 warmup
steps, beta2 0.99, weight decay 0.1 on matrices only, clip 1.0, dropout 0, no biases. Every one
is a flag.

Writes to ``--out-dir``: ``tokenizer.json``, ``metrics.jsonl`` (one line per logged step and per
evaluation), ``loss.png``, ``checkpoints/step_*.safetensors`` (the full train state, config and
data position; ``--resume`` picks the newest) and ``samples.txt``. The final lines printed are
the validation loss (nanoGPT's estimate: ``--eval-iters`` random batches; and the exact loss
over the whole validation split) and the wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import functional_llm as fl
from experiments import cli, code_eval, stdlib_text
from functional_llm import checkpoint, data, losses, optim, random, runs, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    count, size, real = cli.positive_int, cli.nonnegative_int, cli.nonnegative_float
    a("--data", help="a UTF-8 text file (default: the Python standard library's source)")
    a("--corpus-mb", type=cli.positive_float, default=4.0, help="size of the default corpus")
    a(
        "--tokenizer",
        choices=("char", "byte", "bpe"),
        default="char",
        help="bpe: byte-level BPE of --bpe-vocab ids trained on the corpus (saved with the run)",
    )
    a("--bpe-vocab", type=count, default=2048)
    a(
        "--code-eval",
        type=cli.nonnegative_int,
        default=50,
        help="held-out lines and functions completed at the end (stdlib corpus; 0: none)",
    )
    a(
        "--fim-rate",
        type=cli.rate,
        default=0.0,
        help="share of training windows in fill-in-the-middle order (4 sentinel ids are added)",
    )
    a("--out-dir", default="out/pretrain_gpt")
    cli.add_run_args(p)
    a("--flavour", choices=("gpt2", "llama"), default="gpt2",
      help="gpt2: nanoGPT's architecture; llama: RoPE, RMSNorm, SwiGLU, untied output")  # fmt: skip
    a("--n-layer", type=count, default=4)
    a("--n-head", type=count, default=4)
    a("--n-embd", type=count, default=128)
    a("--block-size", type=count, default=64)
    a("--dropout", type=cli.rate, default=0.0)
    a("--bias", action="store_true", help="biases in linear layers and norms (nanoGPT: off)")
    a("--batch-size", type=count, default=12)
    a("--accumulate", type=count, default=1, help="micro-batches per step (accumulation)")
    a("--max-iters", type=count, default=2000)
    a("--lr", type=cli.positive_float, default=1e-3)
    a("--min-lr", type=real, default=1e-4)
    a("--warmup-iters", type=size, default=100)
    a("--lr-decay-iters", type=count, default=None, help="default: max-iters")
    a("--beta2", type=cli.rate, default=0.99)
    a("--weight-decay", type=real, default=0.1)
    a("--grad-clip", type=real, default=1.0, help="0 turns clipping off")
    a("--eval-interval", type=count, default=250)
    a("--eval-iters", type=count, default=20)
    a("--log-interval", type=count, default=10)
    a("--ckpt-interval", type=count, default=500)
    a("--seed", type=size, default=1337)
    a("--compile", action="store_true", help="torch.compile the whole step (fullgraph)")
    a("--no-donate", action="store_true",
      help="the pure step: each step returns a fresh state. By default an eager, unsharded "
           "step without --skip-nonfinite reuses the old state's buffers (fused in-place "
           "AdamW), which the loop never reads again")  # fmt: skip
    a("--remat", action="store_true", help="recompute block activations in the backward pass")
    a("--bf16", action="store_true", help="bfloat16 compute, float32 master params")
    a("--threads", type=count, default=None, help="torch intra-op threads")
    cli.add_device_args(p)
    a("--mesh", type=cli.mesh_spec, default=None,
      help="under torchrun: mesh axes, e.g. dp=2, dp=2,tp=2, pp=2")  # fmt: skip
    a("--timeout", type=cli.positive_float, default=300.0,
      help="seconds a collective waits for a stalled rank before the run fails")  # fmt: skip
    a("--microbatches", type=count, default=2, help="with a pp axis: micro-batches per step")
    a("--schedule", default="1f1b", choices=("1f1b", "gpipe"), help="with a pp axis")
    a("--rules", default=None, help="logical=mesh axis pairs, e.g. batch=dp,heads=tp,mlp=tp")
    a("--param-rules", default="", help="rules for stored params only, e.g. embed=dp (FSDP)")
    a("--fsdp", action="store_true", help="shorthand for --param-rules embed=dp")
    a("--sample-chars", type=size, default=300)
    a("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters
    args.warmup_iters = min(args.warmup_iters, args.lr_decay_iters - 1)  # >= 1 cosine step
    # a compiled step returns fresh buffers, --skip-nonfinite keeps the previous state, and a
    # sharded step works on DTensors: those cannot donate
    args.donate = not (args.no_donate or args.compile or args.skip_nonfinite or args.mesh)
    mesh = _pairs(args.mesh)
    if "pp" in mesh:
        if set(mesh) - {"pp", "dp"}:
            p.error(f"--mesh {args.mesh}: a pipeline runs on pp and dp axes only")
        unsupported = {
            "--compile": args.compile, "--bf16": args.bf16, "--remat": args.remat,
            "--resume": args.resume, "--dropout": args.dropout, "--rules": args.rules,
            "--param-rules": args.param_rules, "--fsdp": args.fsdp,
            "--accumulate": args.accumulate != 1, "--skip-nonfinite": args.skip_nonfinite,
        }  # fmt: skip
        given = [flag for flag, value in unsupported.items() if value]
        if given:
            p.error(f"--mesh {args.mesh}: {', '.join(given)} not supported with a pp axis")
        if args.batch_size % args.microbatches:
            p.error(
                f"--microbatches {args.microbatches} must divide --batch-size "
                f"{args.batch_size} (the pp pipeline splits each batch into micro-batches)"
            )
    try:  # the model flags, checked now rather than after the corpus is read
        model_config(args, vocab_size=2)
    except ValueError as err:
        p.error(f"the model flags do not make a valid model: {err}")
    if args.mesh and args.device:
        p.error("--device: under --mesh the mesh places every tensor (one device per rank)")
    if args.mesh and "RANK" not in os.environ:
        p.error(f"--mesh {args.mesh} runs under torchrun: torchrun --nproc-per-node N "
                "-m experiments.pretrain_gpt --mesh ...")  # fmt: skip
    return args


def _pairs(text: str | None) -> dict[str, str]:
    """``"a=b,c=d"`` to ``{"a": "b", "c": "d"}`` (``none`` maps to None)."""
    pairs = [item.split("=", 1) for item in (text or "").split(",") if item]
    return {k.strip(): (None if v.strip() == "none" else v.strip()) for k, v in pairs}


def sharding(args: argparse.Namespace, model: Any) -> fl.parallel.Plan | None:
    """The plan for ``--mesh`` (None without one, or for a pipeline): the mesh, and the rules
    given or implied."""
    if not args.mesh or "pp" in _pairs(args.mesh):
        return None
    shape = {k: int(v) for k, v in _pairs(args.mesh).items()}
    implied = fl.parallel.Rules.for_mesh(shape, fsdp=args.fsdp)
    rules = _pairs(args.rules) if args.rules else implied.rules
    params = {**_pairs(args.param_rules), **implied.params}
    mesh = fl.parallel.make_mesh(shape, timeout=args.timeout)
    return fl.parallel.Plan(mesh, fl.parallel.Rules(rules, params), model.axes())


def pipelined(
    args: argparse.Namespace, model: Any, opt: optim.GradientTransformation
) -> fl.parallel.pipeline.PipelineStep | None:
    """The pipeline step for a ``--mesh`` with a ``pp`` axis (None otherwise): the model's own
    stages (``GPT.stages``), one per ``pp`` rank, run by ``torch.distributed.pipelining``."""
    shape = {k: int(v) for k, v in _pairs(args.mesh).items()}
    if "pp" not in shape:
        return None
    return fl.parallel.pipeline.PipelineStep(
        model.stages(shape["pp"]), fl.parallel.make_mesh(shape, timeout=args.timeout), opt,
        n_microbatches=args.microbatches, schedule=args.schedule,
        clip_norm=args.grad_clip or None,
    )  # fmt: skip


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """The text in pieces at line ends, for the BPE trainer (it learns merges within pieces)."""
    out, at = [], 0
    while at < len(text):
        end = text.find("\n", at + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[at:end])
        at = end
    return out


def corpus(args: argparse.Namespace, tok: Any = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The run's text (``--data`` or the stdlib corpus), its tokenizer (trained on the text
    unless given), and the token ids split 90/10 into train and validation; each split must
    hold at least one window of ``--block-size`` + 1 tokens."""
    text = data.read_text(args.data) if args.data else stdlib_text.stdlib_corpus(args.corpus_mb)
    if tok is None and args.tokenizer == "bpe":
        tok = data.SubwordTokenizer.train(_chunks(text), args.bpe_vocab, kind="bpe")
    elif tok is None:
        tok = data.CharTokenizer.train(text) if args.tokenizer == "char" else data.ByteTokenizer()
    try:
        ids = torch.from_numpy(tok.encode(text))
    except ValueError as err:  # a character the resumed run's tokenizer has never seen
        raise data.DataError(f"{args.data or 'the corpus'}: {err}") from None
    split = int(0.9 * len(ids))
    if min(split, len(ids) - split) <= args.block_size:
        raise data.DataError(
            f"{args.data or 'the corpus'}: {len(ids):,} tokens split into {split:,} for training "
            f"and {len(ids) - split:,} for validation; each needs more than --block-size "
            f"{args.block_size}"
        )
    return tok, ids[:split], ids[split:]


def model_config(args: argparse.Namespace, vocab_size: int) -> fl.models.GPTConfig:
    fields = dict(
        vocab_size=vocab_size, max_seq_len=args.block_size, d_model=args.n_embd,
        n_layers=args.n_layer, n_heads=args.n_head, dropout=args.dropout, bias=args.bias,
        remat=args.remat, dtype=cli.dtype(args),
    )  # fmt: skip
    if args.flavour == "llama":
        return fl.models.GPTConfig.llama(**fields)
    return fl.models.GPTConfig(**fields)


def optimizer(args: argparse.Namespace) -> optim.GradientTransformation:
    """nanoGPT's AdamW: decay on tensors with 2+ axes (matrices, embeddings), not norms/biases;
    its schedule: step t < warmup has lr (t + 1) / (warmup + 1), then cosine to ``min_lr``.
    Its learning rate lives in the state (``inject_hyperparams``), where the step reads the rate
    it reports. A donated step (the default when eager) runs the same update as one fused
    in-place kernel per group (AdamW's ``update_in_place``)."""
    schedule = optim.warmup_cosine(
        args.lr, args.warmup_iters, args.lr_decay_iters,
        init_value=args.lr / (args.warmup_iters + 1), end_value=args.min_lr,
    )  # fmt: skip
    decay = lambda params: fl.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    fixed = ("mask", "b1", "b2", "eps", "weight_decay")  # Python floats: the faster kernels
    return optim.inject_hyperparams(optim.adamw, static_args=fixed)(
        schedule, b1=0.9, b2=args.beta2, weight_decay=args.weight_decay, mask=decay
    )


def estimate(eval_step, params, tokens, args, key) -> float:
    """nanoGPT's estimate: the mean loss over ``eval_iters`` random batches."""
    batches = [
        data.sample_windows(tokens, random.fold_in(key, i), args.batch_size, args.block_size)
        for i in range(args.eval_iters)
    ]
    return train.evaluate(eval_step, params, batches)["loss"]


OUTPUTS = ("checkpoints", "metrics.jsonl", "tokenizer.json", "loss.png", "samples.txt")


def build(args: argparse.Namespace, tok: Any) -> tuple[Any, Any, Any, train.TrainState]:
    """``(config, model, optimizer, fresh state)`` for a tokenizer's vocabulary."""
    cfg = model_config(args, tok.vocab_size + (len(data.fim.SENTINELS) if args.fim_rate else 0))
    model = fl.models.GPT(cfg)
    opt = optimizer(args)
    k_init, k_train = random.split(random.key(args.seed), 5)[:2]
    return cfg, model, opt, train.init_state(model.init(k_init), opt, k_train)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 owns the folder
        runs.prepare(out, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS)
    source = args.data or f"Python {sys.version.split()[0]} standard library source"
    ckpts = checkpoint.Checkpointer(out / "checkpoints", keep=2)
    restored, tok = None, None
    if args.resume:  # the state's template comes from the checkpoint's own tokenizer
        template = lambda tok: {"state": build(args, tok)[3]}  # noqa: E731
        restored, tok = cli.resume_with_tokenizer(ckpts, out / "tokenizer.json", template)
    tok, train_ids, val_ids = corpus(args, tok)
    if restored is None and int(os.environ.get("RANK", "0")) == 0:
        tok.save(out / "tokenizer.json")

    cfg, model, opt, state = build(args, tok)
    if restored is not None:
        state = restored.state["state"]
    plan = sharding(args, model)
    precision = train.Precision("float32", "bfloat16") if args.bf16 else None
    loss_fn = plan.loss(losses.next_token(model)) if plan else losses.next_token(model)
    step = train.make_step(
        loss_fn, opt, accumulate=args.accumulate, precision=precision,
        clip_norm=args.grad_clip or None, donate=args.donate, skip_nonfinite=args.skip_nonfinite,
    )  # fmt: skip
    eval_step = train.make_eval_step(loss_fn, precision)
    if args.compile:
        step = train.compile(step, fullgraph=plan is None)
        eval_step = train.compile(eval_step, fullgraph=plan is None)
    where = torch.device("cpu") if args.mesh else cli.device(args)  # a mesh places its shards
    state = cli.to_device(state, where)
    step, eval_step = cli.on_device(step, where), cli.on_device(eval_step, where)

    _, k_train, k_data, k_eval, k_sample = random.split(random.key(args.seed), 5)
    pipe = pipelined(args, model, opt)
    if pipe is not None:  # this rank's stage: its params and optimizer state
        template, step = state.params, pipe
        state = pipe.init_state(template, k_train)
    if plan is not None:  # every rank holds the same state and batches; each keeps its shard
        state = plan.shard(state)
        step = _on_shards(plan, plan.step(step))
    distributed = plan is not None or pipe is not None
    rank0 = not distributed or torch.distributed.get_rank() == 0
    start = int(state.step)
    n_tokens, n_params = len(train_ids) + len(val_ids), fl.tree.size(state.params)
    say = print if rank0 else lambda *a, **k: None
    say(f"{source}: {n_tokens:,} tokens, vocab {tok.vocab_size}; {n_params:,} parameters; "
          f"steps {start}..{args.max_iters}")  # fmt: skip

    meta = {"config": checkpoint.config_to_dict(cfg), "args": vars(args), "source": source,
            "tokenizer": tok.to_json()}  # fmt: skip
    kept = restored.metadata.get("metrics_records") if restored else None
    log = runs.MetricsLog(out / "metrics.jsonl", keep=kept) if rank0 else None
    record = log.record if log is not None else lambda entry: None
    guard = cli.Guard(args.skip_nonfinite)

    def full_params() -> Any:
        """Plain params (gathered on every rank: evaluation and sampling run unsharded)."""
        if pipe is not None:
            return pipe.gather(state.params, template)
        return plan.gather(state.params) if plan else state.params

    def save(at: int, records: int | None = None) -> Path:
        """Checkpoint step ``at``; ``records``: how many metrics records belong before it (a
        resumed run keeps those), by default all so far."""
        guard.check()  # a diverged state is never written
        if pipe is not None:  # each stage holds its own optimizer state: params-only checkpoints
            full, what = full_params(), "params"
        else:
            full, what = (plan.gather(state) if plan else state), "state"  # a collective
        if rank0:
            kept = len(log.records) if records is None else records
            ckpts.save(at, {what: full}, {**meta, "metrics_records": kept})
        return ckpts.path(at)

    def evaluation(at: int) -> dict:
        guard.check()
        key = random.fold_in(k_eval, at)
        entry = {"step": at}
        for i, (name, tokens) in enumerate((("train_loss", train_ids), ("val_loss", val_ids))):
            entry[name] = estimate(eval_step, full_params(), tokens, args, random.fold_in(key, i))
        record(entry)
        return entry

    train_started = time.perf_counter()
    bar = tqdm(
        range(start, args.max_iters), initial=start, total=args.max_iters, mininterval=1,
        disable=not rank0,
    )  # fmt: skip
    with runs.interruptible() as stop:
        for it in bar:
            if it % args.eval_interval == 0:
                e = evaluation(it)
                bar.set_postfix(train=f"{e['train_loss']:.3f}", val=f"{e['val_loss']:.3f}")
            batch = data.sample_windows(
                train_ids, random.fold_in(k_data, it), args.batch_size * args.accumulate,
                args.block_size,
            )  # fmt: skip
            if args.fim_rate:  # the same key stream as the windows, one step further in
                k_fim = random.fold_in(random.fold_in(k_data, it), 1)
                batch = data.fim.FIM(tok.vocab_size).windows(k_fim, batch, args.fim_rate)
            state, metrics = step(state, batch)
            guard.watch(it + 1, metrics)
            if (it + 1) % args.log_interval == 0:
                guard.check()
                record({"step": it + 1, **{k: float(v) for k, v in metrics.items()}})
            if (it + 1) % args.ckpt_interval == 0:
                save(it + 1)
            if cli.agreed_stop(stop, it + 1, args.log_interval) and it + 1 < args.max_iters:
                cli.leave(stop, it + 1, save, bar, say)
    train_seconds = time.perf_counter() - train_started
    trained = len(log.records) if log is not None else 0  # the final evaluation comes after

    final = evaluation(args.max_iters)
    full_val = train.evaluate(
        eval_step, full_params(), data.eval_windows(val_ids, 64, args.block_size)
    )["loss"]
    covered = (len(val_ids) - 1) // args.block_size * args.block_size  # eval_windows' targets
    bpb = code_eval.bits_per_byte(full_val, covered, tok.decode(val_ids[1 : 1 + covered].tolist()))
    record({"step": args.max_iters, "full_val_loss": full_val, "val_bits_per_byte": bpb})
    save(args.max_iters, trained)
    params = full_params()
    if log is None:
        return {"val_loss": final["val_loss"], "full_val_loss": full_val}
    if not args.no_plot:
        cli.plot_losses(log.records, out / "loss.png")
    if guard.skip:
        say(f"{int(guard.skipped)} steps skipped for a non-finite loss or gradient")
    prompt = val_ids[: args.block_size // 2][None].to(where)
    generated = fl.generate.generate(  # with the cache, rolling past the context window
        model, params, prompt, max_new_tokens=args.sample_chars, key=k_sample.to(where),
        temperature=0.8, top_k=20, max_len=args.block_size, rolling=True,
    ).tokens  # fmt: skip
    sample_text = tok.decode([i for i in generated[0].tolist() if i < tok.vocab_size])
    (out / "samples.txt").write_text(sample_text, encoding="utf-8")
    scores = {}
    if args.code_eval and not args.data:  # held-out standard-library files
        held_out = stdlib_text.stdlib_files(args.corpus_mb)[1]
        scores = code_eval.evaluate(fl.nn.inference(model), params, tok, held_out,
                                    key=random.key(args.seed + 7), n=args.code_eval)  # fmt: skip
        log.record({"step": args.max_iters, "code_eval": scores})
    log.close()
    total = time.perf_counter() - started
    print(f"--- sample (prompt: {prompt.shape[1]} validation tokens) ---\n{sample_text}\n---")
    print(f"val loss {final['val_loss']:.4f} (estimate, {args.eval_iters} batches), "
          f"{full_val:.4f} (whole split); train loss {final['train_loss']:.4f}")  # fmt: skip
    print(f"held-out bits per byte {bpb:.4f}" + "".join(
        f"; {k.replace('_', ' ')} {v:.3f}" for k, v in scores.items()))  # fmt: skip
    print(f"wall time {total:.1f} s (training loop {train_seconds:.1f} s); outputs in {out}")
    return {
        "val_loss": final["val_loss"], "full_val_loss": full_val, "wall_s": total,
        "train_s": train_seconds, "val_bits_per_byte": bpb, **scores,
    }  # fmt: skip


def _on_shards(plan: fl.parallel.Plan, fn: Any) -> Any:
    """``fn(x, batch)`` with the full batch sharded first (each rank keeps its part)."""
    return lambda x, batch: fn(x, plan.shard_batch(batch))


if __name__ == "__main__":
    try:
        cli.main_guard(main)
    finally:  # under torchrun: leave the group before exit (its threads must not outlive it)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
