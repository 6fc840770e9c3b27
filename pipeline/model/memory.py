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

Checked against measurement: ``benchmarks/memory_plan.py`` (plan vs the peak of real training
steps on CPU; BENCHMARKS.md). ZeRO-2/3, fp32 and bf16 are measured there; ZeRO-0/1 in bf16 follow
the ZeRO paper's accounting and are not; nor are the device reserves and the fused optimizers'
step on GPU / NPU (no device here). Grouped-query attention is counted with its keys and values
repeated to every head (transformers' SDPA path; a kernel that reads them unrepeated saves less).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from backends.deepspeed_engine import REDUCE_BUCKET_ELEMENTS
from pipeline.devices import DEVICES, GIB, Device, device_named
from pipeline.recipe import Recipe, RecipeError
from ppllava.config import VIDEO, PPLLaVAConfig

FRAGMENTATION = 0.10            # of a device kept free for the allocator's fragmentation
PREFETCH_BUCKET = 50_000_000    # ZeRO-3 stage3_prefetch_bucket_size default (elements)
PERSISTENCE = 100_000           # ZeRO-3 stage3_param_persistence_threshold: smaller parameters stay whole
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

    def verdict(self, device: Device) -> tuple[bool, str]:
        """(fits, "fits: 12.3 GiB free (15 %)") with the device's runtime reserve and the margin."""
        needed = self.total + int(device.reserve_gib * GIB)
        free = device.memory - needed
        share = free / device.memory
        if share >= FRAGMENTATION:
            return True, f"fits: {_gib(free)} GiB free ({share:.0%})"
        if free >= 0:
            return False, f"too tight: {_gib(free)} GiB free ({share:.0%}, under the {FRAGMENTATION:.0%} margin)"
        return False, f"does not fit: {_gib(-free)} GiB short"


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def _size(value: int) -> str:
    """Bytes as GiB, or MiB below one GiB (a tiny model's plan is all MiB)."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def _amount(numbers: int) -> str:
    """A parameter count in B, M or K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if numbers >= scale:
            return f"{numbers / scale:.2f} {unit}"
    return str(numbers)


# -- the model on the meta device -------------------------------------------------------------

@dataclass
class _Counts:
    """Parameters (elements) of a meta model as a stage sets it up."""
    total: int
    trained: int
    vision: int                 # the vision tower's (with the BT-Adapter's when frozen)
    vision_trained: int
    largest_module: int         # the most elements one module holds directly (ZeRO-3 gathers per module)
    persistent: int             # parameters under ZeRO-3's persistence threshold, kept whole


def _meta_model(config: PPLLaVAConfig, parts: dict[str, bool], lora) -> torch.nn.Module:
    from pipeline.model.setup import set_trained_parts
    from ppllava import PPLLaVAForConditionalGeneration

    with torch.device("meta"):
        model = PPLLaVAForConditionalGeneration._from_config(copy.deepcopy(config))
        set_trained_parts(model, parts, lora)
    return model


def _count(model: torch.nn.Module) -> _Counts:
    total = trained = vision = vision_trained = persistent = largest = 0
    for name, parameter in model.named_parameters():
        numel = parameter.numel()
        total += numel
        trained += numel if parameter.requires_grad else 0
        if name.startswith(("vision_tower.", "bt_adapter.")):
            vision += numel
            vision_trained += numel if parameter.requires_grad else 0
        persistent += numel if numel < PERSISTENCE else 0
    for module in model.modules():
        largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))
    return _Counts(total, trained, vision, vision_trained, largest, persistent)


ATTENTION = "ppllava_memory_plan"


def _fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as a fused kernel saves it (q, k, v, output, log-sum-exp): meta tensors only."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # as transformers' SDPA path does for grouped-query attention
        key, value = (tensor.repeat_interleave(groups, dim=1) for tensor in (key, value))
    output = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal=True,
                                                                        scale=scaling)[0]
    return output.transpose(1, 2).contiguous(), None


@dataclass
class _Saved:
    """Bytes autograd saves in one forward, by where: before the LLM's decoder layers (the visual
    path, the embeddings), inside them, after them (final norm, logits, loss)."""
    before: int = 0
    in_layers: int = 0
    head: int = 0
    largest_in_layers: int = 0
    largest_in_head: int = 0
    layers: int = 0
    layer_input: int = 0        # one layer's input (what a checkpointed layer keeps)

    def add(self, where: str, size: int) -> None:
        setattr(self, where, getattr(self, where) + size)
        if where == "in_layers":
            self.largest_in_layers = max(self.largest_in_layers, size)
        elif where == "head":
            self.largest_in_head = max(self.largest_in_head, size)


@contextmanager
def _saved_tensor_meter(model: torch.nn.Module, layers: torch.nn.ModuleList, saved: _Saved):
    """Add the size of every tensor autograd saves to ``saved`` (each storage once, parameters not)."""
    parameters = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}   # kept alive so ids are not reused
    where = ["before"]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in parameters and id(base) not in seen:
            seen[id(base)] = base
            saved.add(where[0], base.numel() * base.element_size())
        return tensor

    def enter(module, args, kwargs):
        where[0] = "in_layers"
        if not saved.layer_input:
            hidden = args[0] if args else kwargs["hidden_states"]
            saved.layer_input = hidden.numel() * hidden.element_size()

    def leave(module, args, output):
        where[0] = "head" if module is layers[-1] else "before"

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter, with_kwargs=True),
                                                layer.register_forward_hook(leave))]
    saved.layers = len(layers)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _meta_forward(model, config: PPLLaVAConfig, dtype: torch.dtype, videos: int, rows: int, tokens: int,
                  dpo: bool) -> _Saved:
    """Saved activations of one micro-batch: ``videos`` videos through the visual path, ``rows``
    sequences of ``tokens`` through the LLM (the loss as the stage takes it)."""
    from transformers import AttentionInterface, PretrainedConfig

    from pipeline.preference import sequence_logps
    from ppllava.pooling import pool_tokens, relevance

    AttentionInterface.register(ATTENTION, _fused_attention)
    model.to(dtype)
    for module in model.modules():  # every tower's attention (the model's config is _meta_model's copy)
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config._attn_implementation = ATTENTION
    language_model = model.language_model
    model.train()
    saved = _Saved()
    meta = {"device": "meta"}
    layers = language_model.get_decoder().layers
    with _saved_tensor_meter(model, layers, saved):
        # The visual path of one video per sample, as visual_tokens runs it (without its checks).
        frames, side, size = config.num_frames, config.patches_per_side, config.vision_config.image_size
        for _ in range(videos):
            pixels = torch.empty(frames, 3, size, size, dtype=dtype, **meta)
            projected, clip_visual = model.encode_frames(pixels)
            prompt = torch.zeros(1, config.clip_context_length, dtype=torch.long, **meta)
            scores = relevance(clip_visual.reshape(1, -1, clip_visual.shape[-1]), model.encode_prompts(prompt, None),
                               model.logit_scale)
            kernel, stride = config.pooling_geometry(VIDEO)
            pool_tokens(projected.reshape(1, frames, side, side, -1), scores.reshape(1, frames, side, side).to(dtype),
                        kernel, stride, config.window_temperature, config.pooling_mode, config.second_video_kernel)
        upstream = any(p.requires_grad for name, p in model.named_parameters() if not name.startswith("language_model."))
        embeds = torch.empty(rows, tokens, config.text_config.hidden_size, dtype=dtype, requires_grad=upstream, **meta)
        labels = torch.zeros(rows, tokens, dtype=torch.long, **meta)
        if dpo:
            sequence_logps(language_model(inputs_embeds=embeds, use_cache=False).logits, labels)
        else:
            language_model(inputs_embeds=embeds, labels=labels, use_cache=False)
    return saved


def _pixel_bytes(config: PPLLaVAConfig, videos: int, element: int = 4) -> int:
    """A micro-batch's frames (the loader's pixels are fp32; the tower reads them in its dtype)."""
    size = config.vision_config.image_size
    return videos * config.num_frames * 3 * size * size * element


def _vision_forward_bytes(config: PPLLaVAConfig, videos: int, element: int) -> int:
    """The frozen tower's no-grad forward of ``videos`` videos at its peak: its input in the
    training dtype, every hidden state (they are all returned), one layer's working set (its MLP's
    input, hidden and output)."""
    vision = config.vision_config
    tokens = videos * config.num_frames * (config.patches_per_side ** 2 + 1)
    states = (vision.num_hidden_layers + 1) * tokens * vision.hidden_size
    working = tokens * (2 * vision.hidden_size + 2 * vision.intermediate_size)
    return (states + working) * element + _pixel_bytes(config, videos, element)


# -- the plan ---------------------------------------------------------------------------------

_SAVED: dict[tuple, _Saved] = {}   # recent meta forwards' counts


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
    model = _meta_model(config, parts, section.lora)
    counts = _count(model)
    rows = 2 * micro if stage == "dpo" else micro   # DPO: the chosen and the rejected answer of each pair
    key = (config.to_json_string(), repr(parts), repr(section.lora), dtype, micro, rows, tokens, stage)
    if key not in _SAVED:  # smallest_change plans many variants; most share their activations
        if len(_SAVED) > 16:
            _SAVED.clear()
        _SAVED[key] = _meta_forward(model, config, dtype, micro, rows, tokens, dpo=stage == "dpo")
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
    lines.append(Line("input batch", batches * _pixel_bytes(config, micro),
                      f"{micro} x {config.num_frames} frames in fp32" + (", and the next one" if batches > 1 else "")))
    # The forward: the frozen tower's no-grad pass (and a live DPO reference's) before the LLM's.
    lines.append(Line("vision tower forward", _vision_forward_bytes(config, micro, element),
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
                      f"{_size(saved.before + other)})", backward))
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
    batch = _pixel_bytes(config, micro)   # the pixels dominate a batch
    workers = max(recipe.data.num_workers, 1)
    lines.append(Line("loader batches", batch * (workers * PREFETCH_FACTOR + 1) * per_node,
                      f"{workers} worker(s) x {PREFETCH_FACTOR} batches in flight + the one training, per process"))
    if recipe.model.source in ("llava_next", "authors") and (stage == "sft" or section.init == "model"):
        total = sum(p.numel() for p in _meta_model(config, {}, None).parameters())
        lines.append(Line(f"model conversion (source {recipe.model.source})", total * 4 * per_node,
                          "every process converts the whole model in fp32 first; convert once with "
                          "python -m ppllava.convert and train with source: pretrained"))
    return lines


# -- advice -----------------------------------------------------------------------------------

def _changed(recipe: Recipe, stage: str, change: str) -> Recipe:
    section = getattr(recipe, stage)
    if change == "model.gradient_checkpointing=true":
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, gradient_checkpointing=True))
    if change == f"{stage}.micro_batch_size=1":
        edited = dataclasses.replace(section, micro_batch_size=1, gradient_accumulation_steps=None)
    elif change == f"{stage}.zero_stage=3":
        edited = dataclasses.replace(section, zero_stage=3)
    elif change == f"{stage}.offload_optimizer=true":
        edited = dataclasses.replace(section, zero_stage=max(section.zero_stage, 2), offload_optimizer=True)
    else:  # LoRA on the LLM
        from pipeline.recipe.sections import LoraSection

        edited = dataclasses.replace(section, lora=LoraSection())
        if stage == "sft":
            edited.trainable = dataclasses.replace(section.trainable, llm=False)
    return dataclasses.replace(recipe, **{stage: edited})


def candidate_changes(recipe: Recipe, stage: str) -> list[str]:
    """What could make a stage fit, least disruptive first."""
    section = getattr(recipe, stage)
    changes = []
    if not recipe.model.gradient_checkpointing:
        changes.append("model.gradient_checkpointing=true")
    if section.micro_batch_size > 1:
        changes.append(f"{stage}.micro_batch_size=1")
    if section.zero_stage < 3:
        changes.append(f"{stage}.zero_stage=3")
    if not section.offload_optimizer:
        changes.append(f"{stage}.offload_optimizer=true")
    if section.lora is None:
        changes.append(f"{stage}.lora={{}}")
    return changes


def smallest_change(recipe: Recipe, stage: str, device: Device, tokens: int | None = None) -> str:
    """The fewest changes (the least disruptive first among as many) that make the plan fit; or
    that none does."""
    changes = candidate_changes(recipe, stage)
    for size in range(1, len(changes) + 1):
        for chosen in itertools.combinations(changes, size):
            edited = recipe
            for change in chosen:
                edited = _changed(edited, stage, change)
            if plan_stage(edited, stage, tokens).verdict(device)[0]:
                return f"fits with {' '.join(chosen)}"
    return "does not fit with any of " + (" ".join(changes) if changes else "the memory settings") + \
        ": more devices, a larger device, or a shorter data.max_length"


def _when(phases: tuple[str, ...]) -> str:
    if phases == ALWAYS:
        return "always"
    names = " + ".join(phases)
    return names.replace("loss backward + layer backward", "backward")


def format_plan(plan: MemoryPlan, devices: list[Device], advice: dict[str, str] | None = None) -> str:
    width = max(len(line.label) for line in plan.lines + plan.host) + 2
    whens = {line.label: _when(line.phases) for line in plan.lines}
    when_width = max(len(when) for when in [*whens.values(), plan.peak_phase])

    def row(label: str, size: int, when: str, note: str) -> str:
        return f"  {label:<{width}}{_size(size):>10}  {when:<{when_width}}  {note}".rstrip()

    out = [plan.summary, row("per device", 0, "held in", "").replace("   0.0 MiB", "          ")]
    for line in plan.lines:
        out.append(row(line.label, line.bytes, whens[line.label], line.note))
    held = [line.label for line in plan.lines if plan.peak_phase in line.phases and line.bytes]
    out.append(row("peak", plan.total, plan.peak_phase, "= " + " + ".join(held)))
    out.append("  host memory, per node")
    for line in plan.host:
        out.append(row(line.label, line.bytes, "", line.note))
    for device in devices:
        fits, verdict = plan.verdict(device)
        text = f"  {device.name:<12} {device.memory_gib:>6.1f} GiB, runtime reserve {device.reserve_gib} GiB: {verdict}"
        if not fits and advice and device.name in advice:
            text += f"; {advice[device.name]}"
        out.append(text)
    return "\n".join(out)


def recipe_devices(recipe: Recipe, names: list[str] | None) -> list[Device]:
    """The devices to judge a plan against: those named (--device, else cluster.device), else every
    known device of the recipe's backend family."""
    try:
        if names:
            return [device_named(name, "--device") for name in names]
        if recipe.cluster.device is not None:
            return [device_named(recipe.cluster.device, f"{recipe.source}: cluster.device")]
    except ValueError as error:
        raise RecipeError(str(error)) from None
    family = recipe.backend if recipe.backend in ("cuda", "npu") else None
    return [device for device in DEVICES.values() if family in (None, device.family)]


def training_stages(recipe: Recipe) -> list[str]:
    return [stage for stage in ("sft", "dpo") if getattr(recipe, stage) is not None]


def plan_report(recipe: Recipe, names: list[str] | None = None, tokens: int | None = None) -> tuple[str, list[str]]:
    """(the printed plan of every training stage, the problems: a named device a stage does not fit)."""
    devices = recipe_devices(recipe, names)
    named = bool(names) or recipe.cluster.device is not None
    texts, problems = [], []
    for stage in training_stages(recipe):
        plan = plan_stage(recipe, stage, tokens)
        advice = {}
        for device in devices:
            fits, verdict = plan.verdict(device)
            if not fits and named:
                advice[device.name] = smallest_change(recipe, stage, device, tokens)
                problems.append(f"{stage} on {device.name}: {verdict}; {advice[device.name]}")
        texts.append(format_plan(plan, devices, advice))
    return "\n".join(texts), problems


def judged_on_its_device(recipe: Recipe) -> bool:
    """Whether validate and launch check the plan: the recipe names its device and runs on it (a
    cluster recipe rehearsed or launched on CPU nodes does not)."""
    return recipe.cluster.device is not None and recipe.backend != "cpu"


def check_plan(recipe: Recipe) -> None:
    """RecipeError when a training stage's plan does not fit the recipe's cluster.device."""
    if not judged_on_its_device(recipe):
        return
    _, problems = plan_report(recipe)
    if problems:
        raise RecipeError(f"{recipe.source}: " + "; ".join(problems))

