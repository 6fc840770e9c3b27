"""Whether a memory plan (``pipeline.model.memory``) fits a device, the smallest change of the
recipe that makes it fit, and the report `plan`, `validate` and `launch` print.

A device's verdict adds its runtime reserve (CUDA context, cuBLAS, NCCL; CANN and HCCL on Ascend;
``pipeline.devices``) to the plan's peak and asks 10 % of the device to stay free for allocator
fragmentation: "fits", "too tight" or "does not fit". For a device that does not fit, the search
tries the fewest changes first and, among as many, the least disruptive (gradient checkpointing,
micro-batch 1, ZeRO-3, optimizer offload, LoRA), planning each variant.
"""

from __future__ import annotations

import dataclasses
import itertools

from pipeline.devices import DEVICES, GIB, Device, device_named
from pipeline.model.memory import ALWAYS, MemoryPlan, plan_stage, readable_size
from pipeline.recipe import Recipe, RecipeError

FRAGMENTATION = 0.10            # of a device kept free for the allocator's fragmentation


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def verdict(plan: MemoryPlan, device: Device) -> tuple[bool, str]:
    """(fits, "fits: 12.3 GiB free (15 %)") with the device's runtime reserve and the margin."""
    needed = plan.total + int(device.reserve_gib * GIB)
    free = device.memory - needed
    share = free / device.memory
    if share >= FRAGMENTATION:
        return True, f"fits: {_gib(free)} GiB free ({share:.0%})"
    if free >= 0:
        return False, f"too tight: {_gib(free)} GiB free ({share:.0%}, under the {FRAGMENTATION:.0%} margin)"
    return False, f"does not fit: {_gib(-free)} GiB short"


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
        from pipeline.recipe.training_sections import LoraSection

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
            if verdict(plan_stage(edited, stage, tokens), device)[0]:
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
        return f"  {label:<{width}}{readable_size(size):>10}  {when:<{when_width}}  {note}".rstrip()

    out = [plan.summary, row("per device", 0, "held in", "").replace("   0.0 MiB", "          ")]
    for line in plan.lines:
        out.append(row(line.label, line.bytes, whens[line.label], line.note))
    held = [line.label for line in plan.lines if plan.peak_phase in line.phases and line.bytes]
    out.append(row("peak", plan.total, plan.peak_phase, "= " + " + ".join(held)))
    out.append("  host memory, per node")
    for line in plan.host:
        out.append(row(line.label, line.bytes, "", line.note))
    for device in devices:
        fits, judged = verdict(plan, device)
        text = f"  {device.name:<12} {device.memory_gib:>6.1f} GiB, runtime reserve {device.reserve_gib} GiB: {judged}"
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
            fits, judged = verdict(plan, device)
            if not fits and named:
                advice[device.name] = smallest_change(recipe, stage, device, tokens)
                problems.append(f"{stage} on {device.name}: {judged}; {advice[device.name]}")
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
