"""Offline generator of ALFWorld-format games (`game.tw-pddl` + `traj_data.json`).

ALFWorld's official games are only published as downloads, and no package ships them. This
module writes games in the same format and the same directory structure

    <root>/json_2.1.1/{train,valid_seen,valid_unseen}/<task folder>/<trial folder>/
        game.tw-pddl     {"pddl_domain", "grammar", "pddl_problem", "solvable"}
        traj_data.json   {"task_type", "pddl_params", "turk_annotations", "scene", ...}

over the PDDL domain (`alfred.pddl`), grammar (`alfred.twl2`), goal library and object tables
that the `alfworld` package ships, so ALFWorld's TextWorld engine plays them exactly as it plays
the official games (and ALFWorld's own `AlfredTWEnv` batches them).

Rooms follow ALFRED's four scene types and floor-plan numbering: kitchens 1-30, living rooms
201-230, bedrooms 301-330, bathrooms 401-430. A floor plan's layout (which receptacles it has,
their ALFRED object ids and their navigation locations) is a pure function of (seed, floor plan).
Floor plans 1-6 of each scene type are *unseen*: only the OOD split (valid_unseen) uses them.
Train and IID (valid_seen) games share the *seen* floor plans 7-30 and differ in the objects
placed, their positions, the task's targets and the agent's start. Each of the six task types
is generated only in the scene types ALFRED allows for it (`constants.GOALS_VALID`), and task
types cycle so every split covers all six evenly. Everything is deterministic from the seed.

    python -m epo_jax.envs.alfworld_games --out /path/to/root --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

# `import alfworld` creates ALFWORLD_DATA (default ~/.cache/alfworld) as a side effect; point it
# at this project's own cache before the first import so nothing else is created.
CACHE_ENV_VAR = "EPO_JAX_ALFWORLD_CACHE"


def cache_dir() -> Path:
    """Directory of generated game sets: $EPO_JAX_ALFWORLD_CACHE or ~/.cache/epo_jax/alfworld."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "epo_jax" / "alfworld")


os.environ.setdefault("ALFWORLD_DATA", str(cache_dir()))

import alfworld.gen.constants as alfred_constants  # noqa: E402
import alfworld.gen.goal_library as alfred_goals  # noqa: E402
import alfworld.info as alfworld_info  # noqa: E402

GENERATOR_VERSION = 1
GAMES_DIRNAME = "json_2.1.1"
MANIFEST_NAME = "epo_jax_games.json"

# ALFWorld's task types, in its own numbering order (alfred_tw_env.TASK_TYPES 1..6).
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLIT_DIRS = ("train", "valid_seen", "valid_unseen")
DEFAULT_COUNTS = {"train": 300, "valid_seen": 48, "valid_unseen": 48}

UNSEEN_PLAN_NUMBERS = range(1, 7)
SEEN_PLAN_NUMBERS = range(7, 31)

# The appliance that changes the object's state in each task; it cannot also be the target.
_APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
_ACTION_CLASS = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
_LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")
_MAX_ATTEMPTS = 100
# ALFRED names a basin after its sink / bathtub: "Sink|+00.71|+00.82|-01.77|SinkBasin".
_BASIN_PARENT = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}


class RoomType(NamedTuple):
    """One of ALFRED's scene types: its receptacles (class, min, max count) and objects."""
    name: str
    plan_offset: int
    receptacles: tuple[tuple[str, int, int], ...]
    objects: tuple[str, ...]
    lamps: tuple[str, ...]


ROOM_TYPES = {
    "Kitchen": RoomType(
        "Kitchen", 0,
        (("Cabinet", 4, 12), ("CounterTop", 1, 3), ("Drawer", 2, 8), ("StoveBurner", 2, 4),
         ("Fridge", 1, 1), ("Microwave", 1, 1), ("SinkBasin", 1, 1), ("CoffeeMachine", 1, 1),
         ("GarbageCan", 1, 1), ("Toaster", 1, 1), ("DiningTable", 0, 1), ("Shelf", 0, 3)),
        ("Apple", "Bowl", "Bread", "ButterKnife", "CellPhone", "CreditCard", "Cup", "DishSponge",
         "Egg", "Fork", "Glassbottle", "Kettle", "Knife", "Ladle", "Lettuce", "Mug", "Pan",
         "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker", "SoapBottle", "Spatula", "Spoon",
         "Statue", "Tomato", "Vase", "WineBottle"),
        ()),
    "LivingRoom": RoomType(
        "LivingRoom", 200,
        (("Sofa", 1, 1), ("GarbageCan", 1, 1), ("ArmChair", 0, 2), ("CoffeeTable", 1, 2),
         ("SideTable", 1, 3), ("Drawer", 0, 4), ("Cabinet", 0, 4), ("TVStand", 0, 1),
         ("Shelf", 0, 6), ("Dresser", 0, 1), ("Ottoman", 0, 1), ("DiningTable", 0, 1)),
        ("Book", "Bowl", "Box", "Candle", "CellPhone", "CreditCard", "KeyChain", "Laptop",
         "Newspaper", "Pillow", "Plate", "RemoteControl", "Statue", "TissueBox", "Vase", "Watch",
         "WateringCan"),
        ("DeskLamp", "FloorLamp")),
    "Bedroom": RoomType(
        "Bedroom", 300,
        (("Bed", 1, 1), ("GarbageCan", 1, 1), ("Desk", 0, 2), ("Drawer", 2, 6),
         ("Dresser", 0, 1), ("Shelf", 0, 6), ("SideTable", 1, 2), ("LaundryHamper", 0, 1),
         ("ArmChair", 0, 1), ("Safe", 0, 1), ("Cabinet", 0, 2)),
        ("AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "Box", "CD", "CellPhone",
         "Cloth", "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow", "Statue",
         "TennisRacket", "TissueBox", "Vase", "Watch"),
        ("DeskLamp", "FloorLamp")),
    "Bathroom": RoomType(
        "Bathroom", 400,
        (("SinkBasin", 1, 2), ("Toilet", 1, 1), ("ToiletPaperHanger", 1, 1), ("GarbageCan", 1, 1),
         ("CounterTop", 1, 1), ("BathtubBasin", 0, 1), ("Cabinet", 1, 4), ("Drawer", 0, 4),
         ("HandTowelHolder", 0, 2), ("TowelHolder", 0, 2), ("Shelf", 0, 3), ("Dresser", 0, 1),
         ("Cart", 0, 1)),
        ("Candle", "Cloth", "DishSponge", "HandTowel", "Plunger", "SoapBar", "SoapBottle",
         "SprayBottle", "TissueBox", "ToiletPaper", "Towel"),
        ()),
}


class Receptacle(NamedTuple):
    """A static receptacle: ALFRED class, PDDL id (mangled ALFRED id), PDDL location."""
    rtype: str
    pddl_id: str
    location: str


class Lamp(NamedTuple):
    """A toggleable lamp standing in/on one receptacle of the layout (index into receptacles)."""
    otype: str
    pddl_id: str
    receptacle: int


class Layout(NamedTuple):
    """A floor plan: its scene type and fixed furniture."""
    plan_number: int
    room: str
    receptacles: tuple[Receptacle, ...]
    lamps: tuple[Lamp, ...]


class PlacedObject(NamedTuple):
    """A pickupable object of one game, lying in/on a receptacle (index into receptacles)."""
    otype: str
    pddl_id: str
    receptacle: int


class Game(NamedTuple):
    """One ALFWorld game: a layout, its objects, the agent's start and the task."""
    task_type: str
    layout: Layout
    objects: tuple[PlacedObject, ...]
    agent_location: str
    object_target: str
    parent_target: str    # "" for look_at_obj_in_light
    toggle_target: str    # "" except for look_at_obj_in_light
    task_desc: str


def mangle(alfred_name: str) -> str:
    """ALFRED id -> PDDL name, as ALFWorld mangles it (PlannedGameState.fix_pddl_str_chars)."""
    replacements = {"-": "_minus_", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
    return "".join(replacements.get(char, char) for char in alfred_name)


def _alfred_object_id(otype: str, xyz: tuple[float, float, float]) -> str:
    coords = "|".join(f"{value:+06.2f}" for value in xyz)
    if otype in _BASIN_PARENT:
        return f"{_BASIN_PARENT[otype]}|{coords}|{otype}"
    return f"{otype}|{coords}"


def _unique_id(otype: str, rng: random.Random, used: set[str],
               near: tuple[float, float, float] | None = None) -> tuple[str, tuple[float, ...]]:
    """Samples a position (near `near` when given) whose ALFRED id is not taken yet."""
    while True:
        if near is None:
            xyz = (rng.uniform(-3.0, 3.0), rng.uniform(0.0, 1.8), rng.uniform(-3.0, 3.0))
        else:
            xyz = tuple(value + rng.uniform(-0.4, 0.4) for value in near)
        pddl_id = mangle(_alfred_object_id(otype, xyz))
        if pddl_id not in used:
            used.add(pddl_id)
            return pddl_id, xyz


def _unique_location(rng: random.Random, used: set[str]) -> str:
    """A navigation point loc|x|z|rotation|horizon (grid units of 0.25 m) not taken yet."""
    while True:
        name = mangle(f"loc|{rng.randint(-14, 14)}|{rng.randint(-14, 14)}|{rng.randint(0, 3)}|"
                      f"{rng.choice((0, 15, 30, 45, 60))}")
        if name not in used:
            used.add(name)
            return name


def room_of(plan_number: int) -> RoomType:
    """The scene type of an ALFRED floor-plan number (1-30, 201-230, 301-330, 401-430)."""
    for room in ROOM_TYPES.values():
        if 1 <= plan_number - room.plan_offset <= 30:
            return room
    raise ValueError(f"plan_number={plan_number} is not an ALFRED floor plan; use 1-30, 201-230, "
                     "301-330 or 401-430")


def plan_numbers(room: str, unseen: bool) -> tuple[int, ...]:
    """Floor plans of a scene type: the unseen ones (OOD only) or the seen ones (train, IID)."""
    offset = ROOM_TYPES[room].plan_offset
    numbers = UNSEEN_PLAN_NUMBERS if unseen else SEEN_PLAN_NUMBERS
    return tuple(offset + number for number in numbers)


def build_layout(plan_number: int, seed: int) -> Layout:
    """The furniture of one floor plan; a pure function of (seed, plan_number)."""
    room = room_of(plan_number)
    rng = random.Random(f"epo_jax-alfworld-layout/{seed}/{plan_number}")
    used_ids: set[str] = set()
    used_locations: set[str] = set()
    receptacles, positions = [], []
    for rtype, low, high in room.receptacles:
        for _ in range(rng.randint(low, high)):
            pddl_id, xyz = _unique_id(rtype, rng, used_ids)
            receptacles.append(Receptacle(rtype, pddl_id, _unique_location(rng, used_locations)))
            positions.append(xyz)
    lamps = []
    if room.lamps:
        holders = [i for i, r in enumerate(receptacles) if r.rtype in _LAMP_HOLDERS]
        for otype in rng.sample(room.lamps, rng.randint(1, len(room.lamps))):
            holder = rng.choice(holders)
            pddl_id, _ = _unique_id(otype, rng, used_ids, near=positions[holder])
            lamps.append(Lamp(otype, pddl_id, holder))
    return Layout(plan_number, room.name, tuple(receptacles), tuple(lamps))


def _can_contain(rtype: str, otype: str) -> bool:
    return otype in alfred_constants.VAL_RECEPTACLE_OBJECTS.get(rtype, ())


def _excluded_starts(task_type: str, parent_target: str) -> set[str]:
    """Receptacle types a target object may not start in: the target type (ALFRED's own
    constraint) and, for cooling, the fridge (ALFWorld marks what starts there as cool)."""
    excluded = {parent_target}
    if task_type == "pick_cool_then_place_in_recep":
        excluded.add("Fridge")
    return excluded


def _target_choices(task_type: str, layout: Layout) -> list[tuple[str, str]]:
    """Feasible (object target, parent-or-toggle target) pairs of a task type in a layout."""
    room = ROOM_TYPES[layout.room]
    rtypes = sorted({r.rtype for r in layout.receptacles})
    objects = [o for o in room.objects if any(_can_contain(r, o) for r in rtypes)]
    if task_type in _ACTION_CLASS:
        if _APPLIANCE[task_type] not in rtypes:
            return []
        action_objects = alfred_constants.VAL_ACTION_OBJECTS[_ACTION_CLASS[task_type]]
        objects = [o for o in objects if o in action_objects]
    if task_type == "look_at_obj_in_light":
        return [(o, lamp_type) for o in objects
                for lamp_type in sorted({lamp.otype for lamp in layout.lamps})]
    return [(o, r) for o in objects for r in rtypes
            if r != _APPLIANCE.get(task_type) and _can_contain(r, o)
            and any(_can_contain(start, o) for start in rtypes
                    if start not in _excluded_starts(task_type, r))]


def sample_game(task_type: str, layout: Layout, rng: random.Random) -> Game | None:
    """Places objects and picks targets for one game; None when the layout cannot host the task.

    The target object comes in 1-3 instances (2-3 for pick_two), none starting where the task
    needs it; 6-12 other object types add 1-2 instances each.
    """
    choices = _target_choices(task_type, layout)
    if not choices:
        return None
    object_target, second_target = rng.choice(choices)
    is_look = task_type == "look_at_obj_in_light"
    parent_target = "" if is_look else second_target
    room = ROOM_TYPES[layout.room]
    receptacles = layout.receptacles
    used_ids = {r.pddl_id for r in receptacles} | {lamp.pddl_id for lamp in layout.lamps}

    counts = {object_target: rng.randint(2, 3) if task_type == "pick_two_obj_and_place"
              else rng.randint(1, 3)}
    others = [o for o in room.objects if o != object_target
              and any(_can_contain(r.rtype, o) for r in receptacles)]
    for otype in rng.sample(others, min(len(others), rng.randint(6, 12))):
        counts[otype] = rng.randint(1, 2)

    objects = []
    for otype, count in counts.items():
        excluded = _excluded_starts(task_type, parent_target) if otype == object_target else set()
        holders = [i for i, r in enumerate(receptacles)
                   if _can_contain(r.rtype, otype) and r.rtype not in excluded]
        for _ in range(count):
            holder = rng.choice(holders)
            pddl_id, _ = _unique_id(otype, rng, used_ids)
            objects.append(PlacedObject(otype, pddl_id, holder))

    used_locations = {r.location for r in receptacles}
    template = rng.choice(alfred_goals.gdict[task_type]["templates"])
    task_desc = template.format(obj=object_target.lower(), recep=parent_target.lower(),
                                toggle=second_target.lower() if is_look else "", mrecep="")
    return Game(task_type, layout, tuple(objects), _unique_location(rng, used_locations),
                object_target, parent_target, second_target if is_look else "", task_desc)


def problem_pddl(game: Game) -> str:
    """The PDDL problem of a game over ALFWorld's `alfred` domain, goal from its goal library."""
    receptacles = game.layout.receptacles
    things = [(o.otype, o.pddl_id, o.receptacle) for o in game.objects]
    things += [(lamp.otype, lamp.pddl_id, lamp.receptacle) for lamp in game.layout.lamps]
    otypes = sorted({otype for otype, _, _ in things})
    rtypes = sorted({r.rtype for r in receptacles})
    locations = sorted({r.location for r in receptacles} | {game.agent_location})
    action_objects = alfred_constants.VAL_ACTION_OBJECTS
    lamp_types = set(action_objects["Toggleable"])

    facts = [f"(atLocation agent1 {game.agent_location})"]
    facts += [f"(receptacleAtLocation {r.pddl_id} {r.location})" for r in receptacles]
    facts += [f"(receptacleType {r.pddl_id} {r.rtype}Type)" for r in receptacles]
    facts += [f"(openable {r.pddl_id})" for r in receptacles
              if r.rtype in alfred_constants.OPENABLE_CLASS_SET]
    for otype, pddl_id, holder in things:
        facts += [f"(objectType {pddl_id} {otype}Type)",
                  f"(inReceptacle {pddl_id} {receptacles[holder].pddl_id})",
                  f"(objectAtLocation {pddl_id} {receptacles[holder].location})"]
        if otype in lamp_types:
            facts.append(f"(toggleable {pddl_id})")
            continue
        facts.append(f"(pickupable {pddl_id})")
        for action_class, predicate in (("Cleanable", "cleanable"), ("Heatable", "heatable"),
                                        ("Coolable", "coolable"), ("Sliceable", "sliceable")):
            if otype in action_objects[action_class]:
                facts.append(f"({predicate} {pddl_id})")
        if otype in alfred_constants.MOVABLE_RECEPTACLES_SET:
            facts.append(f"(isReceptacleObject {pddl_id})")
        # ALFWorld marks whatever starts in a fridge as already cool.
        if receptacles[holder].rtype == "Fridge":
            facts.append(f"(isCool {pddl_id})")
    facts += [f"(canContain {r}Type {o}Type)" for r in rtypes for o in otypes if _can_contain(r, o)]
    facts.append("(= (total-cost) 0)")

    goal = alfred_goals.gdict[game.task_type]["pddl"].format(
        obj=game.object_target, recep=game.parent_target, toggle=game.toggle_target, mrecep="")
    object_ids = " ".join(pddl_id for _, pddl_id, _ in things)
    receptacle_ids = " ".join(r.pddl_id for r in receptacles)
    init = "\n   ".join(facts)
    return (f"(define (problem plan_trial)\n (:domain alfred)\n (:objects agent1 - agent\n"
            f"   {object_ids} - object\n   {receptacle_ids} - receptacle\n"
            f"   {' '.join(locations)} - location\n"
            f"   {' '.join(o + 'Type' for o in otypes)} - otype\n"
            f"   {' '.join(r + 'Type' for r in rtypes)} - rtype)\n"
            f" (:init\n   {init})\n{goal.replace('#', '-').strip()}\n")


def task_folder(game: Game) -> str:
    """ALFRED's task folder name: <task type>-<object>-<movable recep>-<parent/toggle>-<plan>."""
    second = game.toggle_target or game.parent_target
    return f"{game.task_type}-{game.object_target}-None-{second}-{game.layout.plan_number}"


def traj_data(game: Game, split_dir: str, trial: str) -> dict:
    """The subset of ALFRED's traj_data.json that ALFWorld reads, plus the scene it came from."""
    templates = alfred_goals.gdict[game.task_type]["templates"]
    names = {"obj": game.object_target.lower(), "recep": game.parent_target.lower(),
             "toggle": game.toggle_target.lower(), "mrecep": ""}
    annotations = [template.format(**names) for template in templates]
    return {
        "task_type": game.task_type,
        "task_id": trial,
        "split": split_dir,
        "pddl_params": {"object_target": game.object_target, "parent_target": game.parent_target,
                        "toggle_target": game.toggle_target, "mrecep_target": "",
                        "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{game.layout.plan_number}",
                  "scene_num": game.layout.plan_number, "scene_type": game.layout.room},
        "turk_annotations": {"anns": [{"task_desc": text[0].upper() + text[1:] + "."}
                                      for text in annotations]},
    }


def _trial_name(rng: random.Random, index: int) -> str:
    """ALFRED's trial folder pattern trial_T<date>_<time>_<micro>; the index keeps it unique."""
    day = rng.randint(1, 28)
    return (f"trial_T201909{day:02d}_{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}"
            f"{rng.randint(0, 59):02d}_{index:06d}")


def _split_games(split_dir: str, count: int, seed: int, layouts: dict[int, Layout],
                 problems: set[str]) -> list[tuple[Game, str]]:
    """`count` (game, PDDL problem) pairs of one split, task types cycling through all six.

    `layouts` caches floor plans; `problems` holds every problem written so far, so no game
    repeats one of an earlier split (IID never replays a train game).
    """
    unseen = split_dir == "valid_unseen"
    games = []
    for index in range(count):
        task_type = TASK_TYPES[index % len(TASK_TYPES)]
        rooms = sorted(set(alfred_constants.GOALS_VALID[task_type]) & set(ROOM_TYPES))
        for attempt in range(_MAX_ATTEMPTS):
            rng = random.Random(f"epo_jax-alfworld-game/{seed}/{split_dir}/{index}/{attempt}")
            plan = rng.choice(plan_numbers(rng.choice(rooms), unseen))
            if plan not in layouts:
                layouts[plan] = build_layout(plan, seed)
            game = sample_game(task_type, layouts[plan], rng)
            problem = "" if game is None else problem_pddl(game)
            if problem and problem not in problems:
                problems.add(problem)
                games.append((game, problem))
                break
        else:
            raise RuntimeError(f"no new {task_type} game for {split_dir} #{index} in "
                               f"{_MAX_ATTEMPTS} attempts; the room tables cannot host it")
    return games


def generate(root: str | os.PathLike, seed: int = 0,
             counts: dict[str, int] | None = None) -> Path:
    """Writes `counts[split]` games per split under `root`/json_2.1.1 (see DEFAULT_COUNTS).

    Returns the root. Deterministic: the same (seed, counts) writes the same files.
    """
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    for split_dir, count in counts.items():
        if split_dir not in SPLIT_DIRS:
            raise ValueError(f"counts has split {split_dir!r}; use keys from {SPLIT_DIRS}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"counts[{split_dir!r}]={count!r}; use a non-negative int")
    root = Path(root)
    domain = Path(alfworld_info.ALFRED_PDDL_PATH).read_text()
    grammar = Path(alfworld_info.ALFRED_TWL2_PATH).read_text()
    layouts: dict[int, Layout] = {}
    problems: set[str] = set()
    for split_dir in SPLIT_DIRS:
        split_games = _split_games(split_dir, counts.get(split_dir, 0), seed, layouts, problems)
        for index, (game, problem) in enumerate(split_games):
            trial = _trial_name(random.Random(f"epo_jax-alfworld-trial/{seed}/{split_dir}/{index}"),
                                index)
            directory = root / GAMES_DIRNAME / split_dir / task_folder(game) / trial
            directory.mkdir(parents=True, exist_ok=True)
            game_data = {"pddl_domain": domain,
                         "grammar": grammar.replace("UNKNOWN GOAL", game.task_desc),
                         "pddl_problem": problem, "solvable": True}
            (directory / "game.tw-pddl").write_text(json.dumps(game_data))
            (directory / "traj_data.json").write_text(
                json.dumps(traj_data(game, split_dir, trial), indent=1))
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "counts": counts}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return root


def ensure_games(root: str | os.PathLike | None = None, seed: int = 0,
                 counts: dict[str, int] | None = None) -> Path:
    """The root of a generated game set, generating it once if absent.

    `root` defaults to a folder under `cache_dir()` named after the generator version, seed and
    counts. Generation goes to a private temporary folder renamed into place, so concurrent
    callers (e.g. pool workers) never see a half-written set.
    """
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    if root is None:
        sizes = "-".join(str(counts.get(split, 0)) for split in SPLIT_DIRS)
        root = cache_dir() / f"generated-v{GENERATOR_VERSION}-seed{seed}-{sizes}"
    root = Path(root)
    if (root / MANIFEST_NAME).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.{os.getpid()}.{time.monotonic_ns()}"
    generate(staging, seed=seed, counts=counts)
    try:
        staging.rename(root)
    except OSError:
        # Another process finished first; its set is identical.
        shutil.rmtree(staging, ignore_errors=True)
        if not (root / MANIFEST_NAME).exists():
            raise
    return root


def main(argv: list[str] | None = None) -> None:
    """Command line: writes a game set and prints its root and generation time."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="root folder; games go to OUT/json_2.1.1")
    parser.add_argument("--seed", type=int, default=0)
    for split_dir in SPLIT_DIRS:
        parser.add_argument(f"--{split_dir.replace('_', '-')}", type=int,
                            default=DEFAULT_COUNTS[split_dir], help=f"number of {split_dir} games")
    args = parser.parse_args(argv)
    counts = {split_dir: getattr(args, split_dir) for split_dir in SPLIT_DIRS}
    start = time.perf_counter()
    root = generate(args.out, seed=args.seed, counts=counts)
    print(f"{sum(counts.values())} games in {time.perf_counter() - start:.2f} s under {root}")


if __name__ == "__main__":
    main()
