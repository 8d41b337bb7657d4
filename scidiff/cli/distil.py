"""``scidiff distil``: a few-step student distilled from a trained model (progressive distillation,
Salimans & Ho 2022), written into the model's checkpoint beside it."""
from __future__ import annotations

import os
import zipfile

from .common import add_expression_source, check_out, device_name, positive_int, seed_value, unit_interval


def add(sub):
    p = sub.add_parser("distil", help="distil a trained model into a few-step sampler",
                       description="Progressive distillation (Salimans & Ho 2022): round by round, a student learns "
                                   "to take in one deterministic DDIM step the teacher's two (--start-steps -> half "
                                   "-> ... -> --steps), on the training cells. The final student is written into the "
                                   "checkpoint beside the model (atomically; every other entry is kept); sample with "
                                   "it: scidiff sample --sampler distilled (also --engine), scidiff export-onnx "
                                   "--sampler distilled, or model.sample(n, sampler='distilled').")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="the training cells (.h5ad)")
    p.add_argument("--steps", type=positive_int, default=4, help="the student's sampling steps (default: 4)")
    p.add_argument("--start-steps", type=positive_int, default=64,
                   help="the teacher's DDIM steps in the first round: --steps times a power of two (default: 64)")
    p.add_argument("--iterations", type=positive_int, default=2000,
                   help="training iterations per round (default: 2000)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--learning-rate", type=unit_interval, default=1e-4,
                   help="Adam's learning rate, annealed linearly to zero in each round (default: 1e-4)")
    add_expression_source(p)
    p.add_argument("--streaming", action="store_true",
                   help="read the cells' batches from the file on disk (an atlas larger than memory, as "
                        "scidiff train --streaming does) instead of loading it")
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--out", default=None, help="checkpoint to write (default: the --model checkpoint, replaced)")
    p.add_argument("--from-student", action="store_true",
                   help="go on from the checkpoint's distilled student (its steps replace --start-steps), e.g. "
                        "halve a 4-step student to 2")


def run(args):
    from ..data.stream_setup import stream_like  # lazy: keeps --help light (anndata, h5py)
    from ..tasks.cells import model_cells, model_spec  # lazy: keeps --help light (torch, anndata)
    from ..training import load_model  # lazy: keeps --help light (torch)
    from ..training.checkpoint import save_student  # lazy: keeps --help light (torch)
    from ..training.distillation import distil, halving_rounds  # lazy: keeps --help light (torch)
    from ..training.trainer import resolve_device  # lazy: keeps --help light (torch)

    out = _check_student_out(args.out, args.data) if args.out is not None else _check_model_writable(args.model)
    model = load_model(args.model, map_location=resolve_device(args.device))
    if args.from_student and model.student is None:
        raise ValueError(f"--from-student: {args.model!r} holds no distilled student to go on from")
    start = model.student.steps if args.from_student else args.start_steps
    try:  # before the cells are read
        halving_rounds(args.steps, start, model.num_timesteps)
    except ValueError as exc:
        if args.from_student:
            raise ValueError(f"--from-student: the student in {args.model!r} samples in {start} steps, so --steps "
                             f"must be that halved one or more times ({_halvings(start)}), got {args.steps}") from None
        raise ValueError(f"--start-steps {args.start_steps} with --steps {args.steps}: {exc}") from None
    use_raw = True if args.use_raw else None  # neither flag: where the model's training cells were read
    if args.streaming:
        cells = stream_like(model_spec(model), args.data, layer=args.layer, use_raw=use_raw).loader(
            args.batch_size, seed=args.seed)
    else:
        _, _, cells = model_cells(model, args.data, layer=args.layer, use_raw=use_raw)
    student = distil(model, cells, steps=args.steps, start_steps=args.start_steps, iterations_per_round=args.iterations,
                     batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                     initial=model.student if args.from_student else None)
    path = save_student(args.model, student, out)
    print(f"wrote a {student.steps}-step student into {path} "
          f"(sample with it: scidiff sample --sampler distilled, or model.sample(n, sampler='distilled'))")


def _check_student_out(out: str, data: str) -> str:
    """``--out``, refused before any work where writing a checkpoint there would fail at the end
    (a folder, a path ending in a separator) or destroy a file that is not a checkpoint (the
    ``--data`` file, any other existing file)."""
    if out.endswith(("/", os.sep)):  # before check_out's general refusal: the file a run folder holds
        raise ValueError(f"--out {out!r} names a folder; give the checkpoint file to write, e.g. "
                         f"{os.path.join(out, 'model.pt')!r}")
    check_out(out, reads={"--data": data})
    if os.path.isfile(out) and not zipfile.is_zipfile(out):
        raise ValueError(f"--out {out!r} exists and is not a checkpoint; distil would replace it with one: "
                         "give a new path, or a scidiff checkpoint to replace")
    return out


def _check_model_writable(model: str) -> None:
    """Without ``--out`` the student is written into the ``--model`` checkpoint: refused before any
    work where its folder cannot be written (a read-only copy of a run), not once it is distilled."""
    from ..data.io import user_path  # lazy: keeps --help light (anndata)
    from ..training.checkpoint import MODEL_FILE  # lazy: keeps --help light (torch)

    path = user_path(model)
    path = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--model {model!r}: the student is written into {path!r}, but there is no permission to "
                         f"write in {folder!r} (a read-only copy of the run?); give --out NEW.pt to write the "
                         f"checkpoint with its student elsewhere")
    return None


def _halvings(steps: int) -> str:
    """``"2 or 1"``: the step counts a student of ``steps`` steps can be halved to."""
    out = []
    while steps % 2 == 0 and steps > 1:
        steps //= 2
        out.append(str(steps))
    return " or ".join(out) if out else "none: it cannot be halved"
