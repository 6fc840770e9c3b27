"""The device memory a training stage of a recipe needs, planned before the job is queued.

`python -m pipeline plan RECIPE [--device a100-40g ...]` prints it; `validate` prints it and
`launch` checks it when the recipe names its device (``cluster.device``), and both stop a recipe
whose plan does not fit it. Nothing is
allocated: the model is built on the meta device from its config (``budget.stage_model_config``:
the recipe's real config.json files where they are readable, the PPLLaVA defaults otherwise), so
a 7B plan takes about a second on a laptop.

Per device (one training process). Each line is held in some phases of a step (the vision
tower's forward, a live DPO reference's forward, the loss's backward, the layers' backward, the
optimizer step); the peak is the phase whose lines sum to the most:

    weights              every parameter in the training dtype (DeepSpeed casts the whole module;
                         the frozen vision tower on its own line); 1/world under ZeRO-3, plus the
                         parameters it gathers around the running module and the small ones it
                         never partitions
    optimizer states     fp32 master weights + Adam's two moments (12 bytes per trained
                         parameter; 1/world from ZeRO-1 on; on the host with offload_optimizer)
    gradients            the trained parameters' partition in the training dtype: ZeRO-3 from
                         the start, ZeRO-1/2 from their first reduction to the step (the
                         backward's end when the reduce bucket holds them all), ZeRO-0 all of them
    reduce bucket        DeepSpeed's (backends.deepspeed_engine.REDUCE_BUCKET_ELEMENTS), allocated
                         at the start under ZeRO-3 and in every micro-step's backward under ZeRO-1/2
    input batch          the micro-batch's frames in fp32 (on CPU also the next batch received)
    vision tower forward its no-grad forward: every hidden state (they are all returned) and one
                         layer's working set
    activations          what autograd saves in the forward for the longest rows: counted by
                         running the visual path and the LLM on meta tensors with a hook on every
                         saved tensor (the model code that runs: LoRA's dropout, fp32 up-casts in
                         norms and loss); with gradient checkpointing each LLM layer keeps its
                         input and one layer is recomputed at a time; the logits and the loss
                         apart (freed before the first parameter gradient)
    backward working     the gradients in flight: twice the largest saved tensor of the loss
                         (its fp32 log-softmax) or of a layer
    optimizer step       the fp32 gradient the optimizer reads (and torch AdamW's full-size
                         temporaries on CPU, where ZeRO flattens the partition into one tensor)
    DPO reference        live without LoRA: a second frozen copy of the model; with LoRA nothing
                         (the policy with its adapters off); precomputed: nothing. A live
                         reference's forward (its logits) in its own phase

The runtime's own share (CUDA context, cuBLAS workspaces, NCCL; CANN and HCCL on Ascend) is a
fixed reserve per device family, and a plan "fits" with 10 % of the device left for allocator
fragmentation. Attention is counted as a fused kernel (flash / memory-efficient SDPA on CUDA,
fused attention on Ascend, PyTorch's flash kernel on CPU): no sequence x sequence matrix.

The module's parts: this one does the accounting (the lines, by phase, per device and per node);
``meta_forward`` counts parameters and saved activations on the meta device; ``memory_fit``
judges a plan on a device, searches the smallest change that makes it fit, and prints the report.

Checked against measurement: ``benchmarks/memory_plan.py`` (plan vs the peak of real training
steps on CPU; BENCHMARKS.md). ZeRO-2/3, fp32 and bf16 are measured there; ZeRO-0/1 in bf16 follow
the ZeRO paper's accounting and are not; nor are the device reserves and the fused optimizers'
step on GPU / NPU (no device here). Grouped-query attention is counted with its keys and values
repeated to every head (transformers' SDPA path; a kernel that reads them unrepeated saves less).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.deepspeed_engine import REDUCE_BUCKET_ELEMENTS
from pipeline.devices import GIB
from pipeline.model.meta_forward import (SavedBytes, count_parameters, meta_forward, meta_model, pixel_bytes,
                                         vision_forward_bytes)
from pipeline.recipe import Recipe
from ppllava.config import PPLLaVAConfig

PREFETCH_BUCKET = 50_000_000    # ZeRO-3 stage3_prefetch_bucket_size default (elements)
PREFETCH_FACTOR = 2             # torch DataLoader's batches in flight per worker


# When a line's memory is held: the phases of a training step, in order. The peak is the phase
# whose lines sum to the most.
PHASES = ("vision forward", "reference forward", "loss backward", "layer backward", "step")
ALWAYS = PHASES


@dataclass
class Line:
    label: str
    bytes: int
    note: str = ""
    phases: tuple[str, ...] = ALWAYS


@dataclass
class MemoryPlan:
    stage: str
    summary: str                         # model, trained parameters, layout
    lines: list[Line]                    # per device
    host: list[Line] = field(default_factory=list)   # per node, host memory (not in the peak)

    def phase_bytes(self, phase: str) -> int:
        return sum(line.bytes for line in self.lines if phase in line.phases)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def total(self) -> int:
        """The peak: the phase that holds the most."""
        return self.phase_bytes(self.peak_phase)


def readable_size(value: int) -> str:
    """Bytes as GiB, or MiB below one GiB (a tiny model's plan is all MiB)."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def _amount(numbers: int) -> str:
    """A parameter count in B, M or K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if numbers >= scale:
            return f"{numbers / scale:.2f} {unit}"
    return str(numbers)


# -- the plan ---------------------------------------------------------------------------------

_SAVED: dict[tuple, SavedBytes] = {}   # recent meta forwards' counts


def plan_stage(recipe: Recipe, stage: str, tokens: int | None = None) -> MemoryPlan:
    """The per-device memory of ``stage`` (sft or dpo) of ``recipe``; ``tokens`` (default
    ``data.max_length``) is the longest sequence a micro-batch row holds."""
    from backends.spec import PRECISIONS
    from pipeline.model.budget import stage_model_config
    from pipeline.model.setup import stage_trained_parts

    section = getattr(recipe, stage)
    config, where, _ = stage_model_config(recipe, stage)
    micro, _, world = recipe.batch_layout(recipe.cluster.world_size, stage)
    dtype = PRECISIONS[section.precision]
    element = dtype.itemsize
    tokens = tokens or recipe.data.max_length
    parts = stage_trained_parts(recipe, stage)
    model = meta_model(config, parts, section.lora)
    counts = count_parameters(model)
    rows = 2 * micro if stage == "dpo" else micro   # DPO: the chosen and the rejected answer of each pair
    key = (config.to_json_string(), repr(parts), repr(section.lora), dtype, micro, rows, tokens, stage)
    if key not in _SAVED:  # smallest_change plans many variants; most share their activations
        if len(_SAVED) > 16:
            _SAVED.clear()
        _SAVED[key] = meta_forward(model, config, dtype, micro, rows, tokens, dpo=stage == "dpo")
    saved = _SAVED[key]
    zero, trained, checkpointing = section.zero_stage, counts.trained, recipe.model.gradient_checkpointing
    split = world if zero == 3 else 1                   # what divides the weights
    state_split = world if zero >= 1 else 1             # what divides the optimizer states
    grad_split = world if zero >= 2 else 1              # what divides the kept gradients
    fused = recipe.backend in ("cuda", "npu") and section.optimizer != "torch_adamw"

    lines: list[Line] = []
    frozen_vision = counts.vision - counts.vision_trained
    others = counts.total - frozen_vision
    lines.append(Line("weights", others * element // split,
                      f"{_amount(others)} parameters in {section.precision}" + (f", 1/{world}" if split > 1 else "")))
    if frozen_vision:
        lines.append(Line("frozen vision tower", frozen_vision * element // split,
                          f"{_amount(frozen_vision)} parameters" + (f", 1/{world}" if split > 1 else "")))
    if zero == 3:
        gathered = (counts.largest_module + PREFETCH_BUCKET + counts.persistent) * element
        lines.append(Line("ZeRO-3 gathered parameters", gathered, "the running module, the prefetch bucket, "
                                                                  "parameters too small to partition"))
    if section.offload_optimizer:
        lines.append(Line("optimizer states", 0, "offloaded to the host (below)"))
    else:
        optimizer = trained * (12 if zero >= 1 else 2 * element) // state_split
        lines.append(Line("optimizer states", optimizer,
                          ("fp32 master weights + Adam moments" if zero >= 1 else "Adam moments") +
                          (f", 1/{state_split}" if state_split > 1 else "")))
    # Gradients: ZeRO-3 keeps a partition buffer from the start; ZeRO-1/2 fill a reduce bucket in the
    # backward and keep their partition from the first reduction (the backward's end when the
    # bucket holds them all) to the step; ZeRO-0 keeps every gradient from the backward to the step.
    gradients = trained * element // grad_split
    note = f"{_amount(trained)} trained parameters" + (f", 1/{grad_split}" if grad_split > 1 else "")
    bucket_note = f"DeepSpeed's, {REDUCE_BUCKET_ELEMENTS:.0e} elements (backends/deepspeed_engine.py)"
    if zero == 3:
        lines.append(Line("gradients", gradients, note))
        lines.append(Line("reduce bucket", REDUCE_BUCKET_ELEMENTS * element, bucket_note))
    elif zero >= 1:
        reduced_early = trained > REDUCE_BUCKET_ELEMENTS
        lines.append(Line("gradients", gradients, note, ("layer backward", "step") if reduced_early else ("step",)))
        # One fresh bucket every micro-step. (In 2 of about 20 CPU runs of benchmarks/memory_plan.py
        # the previous micro-step's bucket was still alive beside it: 95 MiB more in bf16.)
        lines.append(Line("reduce bucket", REDUCE_BUCKET_ELEMENTS * element, bucket_note, ("layer backward",)))
    else:
        lines.append(Line("gradients", gradients, note, ("layer backward", "step")))
    # The micro-batch: on an accelerator its copy; on the CPU the loader's batches themselves (the
    # one training and the next one, received from a worker)
    batches = 2 if recipe.backend == "cpu" else 1
    lines.append(Line("input batch", batches * pixel_bytes(config, micro),
                      f"{micro} x {config.num_frames} frames in fp32" + (", and the next one" if batches > 1 else "")))
    # The forward: the frozen tower's no-grad pass (and a live DPO reference's) before the LLM's.
    lines.append(Line("vision tower forward", vision_forward_bytes(config, micro, element),
                      f"{micro} x {config.num_frames} frames, no grad: its hidden states and one layer",
                      ("vision forward",)))
    if stage == "dpo" and section.reference == "live" and section.lora is None:
        lines.append(Line("DPO reference", counts.total * element // split,
                          "a frozen copy of the start model" + (f", 1/{world}" if split > 1 else "")))
    elif stage == "dpo":
        lines.append(Line("DPO reference", 0, "the policy with its adapters off" if section.lora is not None
                          else "precomputed before training"))
    # The backward: what the forward saved, and the gradients in flight. The loss's backward comes
    # first (the logits' gradients); the first parameter gradient (ZeRO-1/2: the reduce bucket) only
    # after it, when the logits are gone; then layer by layer, a checkpointed layer recomputed.
    one_layer = saved.in_layers // max(saved.layers, 1)
    kept = saved.layers * saved.layer_input if checkpointing else saved.in_layers
    other = saved.in_layers if checkpointing else saved.layers * saved.layer_input + one_layer
    # A live reference runs after the policy's forward: its forward holds the policy's activations.
    after_forward = ("reference forward",) if stage == "dpo" and section.reference == "live" else ()
    backward = (*after_forward, "loss backward", "layer backward")
    lines.append(Line("activations: visual path, LLM layers", saved.before + kept,
                      f"{micro} x {config.num_frames}-frame video, {rows} x {tokens} tokens; gradient checkpointing "
                      f"{'on' if checkpointing else 'off'} (with it {'off' if checkpointing else 'on'}: "
                      f"{readable_size(saved.before + other)})", backward))
    lines.append(Line("activations: logits, loss", saved.head, "", (*after_forward, "loss backward")))
    lines.append(Line("loss backward working memory", 2 * saved.largest_in_head, "the logits' gradients",
                      ("loss backward",)))
    lines.append(Line("layer backward working memory", 2 * saved.largest_in_layers + (one_layer if checkpointing else 0),
                      "a layer's gradients" + (", the layer recomputed" if checkpointing else ""), ("layer backward",)))
    if stage == "dpo" and section.reference == "live":
        logits = rows * tokens * config.text_config.vocab_size * (element + 8)
        lines.append(Line("DPO reference forward", logits, "no grad after the policy's forward: logits, their fp32 "
                                                           "log-softmax", ("reference forward",)))
    # The step: the fp32 gradient the optimizer reads, and torch AdamW's full-size temporaries.
    step_working = trained * 4 // state_split * (3 if not fused else (1 if element != 4 else 0))
    if not section.offload_optimizer:
        lines.append(Line("optimizer step working memory", step_working,
                          "fp32 gradient" + ("" if fused else " and AdamW's temporaries (torch AdamW)"), ("step",)))

    host = _host_lines(recipe, stage, config, micro, world, trained)
    summary = (f"{stage}: {_amount(counts.total)} parameters ({where}), {_amount(trained)} trained"
               f"{' through LoRA' if section.lora is not None else ''}; ZeRO-{zero} over {world} process(es), "
               f"{section.precision}, micro-batch {micro}, {tokens} tokens per row")
    return MemoryPlan(stage, summary, lines, host)


def _host_lines(recipe: Recipe, stage: str, config: PPLLaVAConfig, micro: int, world: int, trained: int
                ) -> list[Line]:
    """Host memory per node: offloaded optimizer, batches in flight, a converted model."""
    per_node = recipe.cluster.procs_per_node
    section = getattr(recipe, stage)
    lines = []
    if section.offload_optimizer:
        lines.append(Line("offloaded optimizer (pinned)", trained * 16 // world * per_node,
                          "fp32 master, Adam moments and fp32 gradients of each process's partition"))
    batch = pixel_bytes(config, micro)   # the pixels dominate a batch
    workers = max(recipe.data.num_workers, 1)
    lines.append(Line("loader batches", batch * (workers * PREFETCH_FACTOR + 1) * per_node,
                      f"{workers} worker(s) x {PREFETCH_FACTOR} batches in flight + the one training, per process"))
    if recipe.model.source in ("llava_next", "authors") and (stage == "sft" or section.init == "model"):
        total = sum(p.numel() for p in meta_model(config, {}, None).parameters())
        lines.append(Line(f"model conversion (source {recipe.model.source})", total * 4 * per_node,
                          "every process converts the whole model in fp32 first; convert once with "
                          "python -m ppllava.convert and train with source: pretrained"))
    return lines
