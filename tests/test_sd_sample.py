"""Sampling a Stable Diffusion student with classifier-free guidance (`sfd_jax.sample --prompts
--guidance`, `fid calc --student --prompts`), on the tiny SD fixture (tests/fixtures/ldm/sd_tiny.*,
README section B).

The student here is a checkpoint of the fixture teacher's own weights, laid out as a distilled SD
student is (the UNet as params; first stage, VP table and CLIP text encoder as buffers). The
reference is a second path built from the teacher's public interface alone: `encode_text` of
caption i for seed i and of "", `denoise(condition=, uncondition=, guidance=)` (proven against the
official `CFGPrecond` at guidance 7.5 in test_sd_teacher.py), the Euler solver and `decode`.
The two paths run the same float32 arithmetic in different batch arrangements (8 devices × 1 seed
against one device, fused differently), so they agree to float32 rounding: the tolerance is 2 ×
the official code's own float32-vs-float64 gap of one guided D at σ_max (sd_tiny.npz), 7e-4; the
measured difference is about 2e-5, and a wrong caption order or guidance moves the images by more
than 1.
"""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from sfd_jax import checkpoint, images, sample, sampling, schedules, solvers
from sfd_jax.config_types import SamplingSettings
from sfd_jax.latent import student as latent_student
from sfd_jax.latent.config import config_to_dict
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"
CAPTIONS = ["a red bicycle against a wall", "two dogs playing in the snow", "a bowl of soup", "a cat on a sofa",
            "a lighthouse at dusk"]
NUM_STEPS = 4  # with AFS: 2 NFE per pass


@pytest.fixture(scope="module")
def teacher():
  return load_teacher(LDM / "sd_tiny.safetensors", arch=LDM / "sd_tiny.yaml")


@pytest.fixture(scope="module")
def tol():
  fx = np.load(LDM / "sd_tiny.npz")
  at_sigma_max = int(np.argmax(fx["in_sigma_D"]))
  return 2 * float(np.abs(fx["D_x_g7p5_fp32"][at_sigma_max].astype(np.float64) - fx["D_x_g7p5_fp64"][at_sigma_max]).max())


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, teacher):
  variables = latent_student.student_variables(teacher.raw_params)
  assert "cond_stage_model" in variables["buffers"]  # the text encoder travels as a buffer
  settings = SamplingSettings(num_steps=NUM_STEPS, schedule_type="discrete", schedule_rho=1.0, afs=True,
                              sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max).to_dict()
  path = tmp_path_factory.mktemp("sd_student") / "run"
  manager = checkpoint.make_manager(path)
  checkpoint.save(manager, 1, variables["params"], variables["buffers"], {"count": np.zeros((), np.int32)},
                  dict(latent_network=config_to_dict(teacher.config), settings=settings, dataset_name="ms_coco"))
  manager.wait_until_finished()
  manager.close()
  return str(path)


@pytest.fixture(scope="module")
def captions_csv(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "captions.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["image_id", "text"])
    writer.writerows(enumerate(CAPTIONS))
  return str(path)


def reference(teacher, seeds, captions, guidance):
  """Seed i's latents, caption i's condition (and ""'s when guided), Euler + AFS on the discrete
  schedule, decoded: `[n, 64, 64, 3]` float32."""
  params = teacher.raw_params
  latents = sampling.seed_latents(jnp.asarray(seeds), latent_student.latent_shape(teacher.config))
  cond = teacher.encode_text(params, captions)
  uncond = teacher.encode_text(params, [""] * len(seeds)) if guidance != 1 else None
  return np.asarray(_solve(teacher, guidance)(params, latents, cond, uncond))


_SOLVERS = {}


def _solve(teacher, guidance):
  """The jitted solve + decode at one guidance (jitted only to keep the test fast)."""
  if guidance not in _SOLVERS:
    t_steps = schedules.get_schedule(NUM_STEPS, teacher.sigma_min, teacher.sigma_max, "discrete", 1.0, vp=teacher.vp)

    def solve(params, latents, cond, uncond):
      denoise = lambda x, sigma: teacher.denoise(params, x, sigma, condition=cond, uncondition=uncond,
                                                 guidance=guidance)
      return teacher.decode(params, solvers.sample(denoise, latents, t_steps, "euler", afs=True))
    _SOLVERS[guidance] = jax.jit(solve)
  return _SOLVERS[guidance]


def test_guided_student_equals_the_teacher_path(teacher, student_dir, tol):
  """Seeds 3, 0, 4 take captions 3, 0, 4; guidance 7.5 in one batch of 2N; NFE counts both passes."""
  model = sampling.load_model(student=student_dir, guidance=7.5)
  assert model.guided and model.nfe == 2 * solvers.nfe("euler", NUM_STEPS, afs=True) == 4
  seeds = [3, 0, 4]
  out = np.concatenate([o for _, o, _ in sampling.model_batches(model, seeds, batch_size=8, captions=CAPTIONS)])
  assert out.shape == (3, 64, 64, 3)
  want = reference(teacher, seeds, [CAPTIONS[s] for s in seeds], 7.5)
  np.testing.assert_allclose(out, want, rtol=0, atol=tol)
  # What the comparison can tell apart: another caption order, or no guidance.
  assert np.abs(reference(teacher, seeds, [CAPTIONS[s] for s in (0, 3, 4)], 7.5) - want).max() > 1000 * tol
  assert np.abs(reference(teacher, seeds, [CAPTIONS[s] for s in seeds], 1.0) - want).max() > 1000 * tol


def test_guidance_one_runs_the_conditional_model_alone(teacher, student_dir, tol):
  model = sampling.load_model(student=student_dir, guidance=1.0)
  assert not model.guided and model.nfe == 2
  out = sampling.generate(model.denoise_fn, model.shape, [1], t_steps=schedules.get_schedule(
      NUM_STEPS, teacher.sigma_min, teacher.sigma_max, "discrete", 1.0, vp=teacher.vp), solver="euler", afs=True,
      variables=model.variables, decode_fn=model.decode_fn,
      **dict(zip(("condition_fn", "condition_inputs"), sampling.text_conditions(model, CAPTIONS, "c.csv"))))
  np.testing.assert_allclose(out, reference(teacher, [1], [CAPTIONS[1]], 1.0), rtol=0, atol=tol)


def test_cli_prompts_and_one_prompt(teacher, student_dir, captions_csv, tmp_path, capsys, tol):
  """`--prompts` (seed i, caption i) and `--prompt` (every seed); PNGs decoded by the first stage."""
  argv = ["--student", student_dir, "--seeds", "2-4", "--batch", "8", "--noprogress"]
  assert sample.main(argv + ["--prompts", captions_csv, "--guidance", "7.5", "--outdir", str(tmp_path / "png"),
                             "--npz", str(tmp_path / "s.npz")]) == 0
  out = capsys.readouterr().out
  assert out.strip().endswith("NFE 4 (guidance 7.5: conditional and unconditional passes)"), out
  pixels = np.load(tmp_path / "s.npz")["arr_0"]
  assert pixels.shape == (3, 64, 64, 3) and (tmp_path / "png" / "000000" / "000004.png").is_file()
  want = reference(teacher, [2, 3, 4], CAPTIONS[2:5], 7.5)
  assert np.abs(pixels.astype(int) - images.to_uint8(want).astype(int)).max() <= 1  # a level where rounding falls
  assert sample.main(argv + ["--prompt", "a photo of a cat", "--npz", str(tmp_path / "cat.npz")]) == 0
  cat = np.load(tmp_path / "cat.npz")["arr_0"]
  want = reference(teacher, [2, 3, 4], ["a photo of a cat"] * 3, 7.5)  # the default guidance
  assert np.abs(cat.astype(int) - images.to_uint8(want).astype(int)).max() <= 1
  assert "NFE 4" in capsys.readouterr().out


def test_cli_samples_the_sd_teacher_itself(teacher, captions_csv, tmp_path, capsys):
  """`--network sd.safetensors --arch ...`: the teacher samples with guidance from its own text
  encoder (caption i for seed i), as the teacher's path does; the solver flags apply."""
  assert not teacher.has_ema  # laid out as v1-5-pruned-emaonly: params are the raw weights
  assert sample.main(["--network", str(LDM / "sd_tiny.safetensors"), "--arch", str(LDM / "sd_tiny.yaml"),
                      "--prompts", captions_csv, "--guidance", "7.5", "--seeds", "1-3", "--batch", "8",
                      "--solver=euler", f"--num_steps={NUM_STEPS}", "--afs", "--npz", str(tmp_path / "t.npz"),
                      "--noprogress"]) == 0
  assert capsys.readouterr().out.strip().endswith("NFE 4 (guidance 7.5: conditional and unconditional passes)")
  got = np.load(tmp_path / "t.npz")["arr_0"]
  want = images.to_uint8(reference(teacher, [1, 2, 3], CAPTIONS[1:4], 7.5))
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a level where float32 rounding falls
  model = sampling.load_model(network=str(LDM / "sd_tiny.safetensors"), arch=str(LDM / "sd_tiny.yaml"))
  assert model.guided and model.nfe == 20 and model.settings.sigma_min == 0.1  # dpmpp, 10 NFE per pass


def test_cli_errors_are_one_line(student_dir, captions_csv, capsys):
  pkl = str(FIXTURES / "edm" / "edm_ddpmpp_uncond.pkl")
  cases = [
      (["--student", student_dir, "--grid", "g.png"], "--prompts or --prompt: a text-conditioned model samples"),
      (["--student", student_dir, "--grid", "g.png", "--prompts", captions_csv, "--seeds", "0-5"],
       "captions.csv: holds 5 captions, but seed 5 takes caption 5"),
      (["--student", student_dir, "--grid", "g.png", "--prompt", "a", "--guidance", "nan"], "--guidance: need a finite"),
      (["--student", student_dir, "--grid", "g.png", "--prompt", "a", "--tokenizer", "/no/tokenizer"],
       "/no/tokenizer: no such file or folder"),
      (["--network", pkl, "--grid", "g.png", "--tokenizer", "/no/tokenizer"], "--tokenizer: the model is not text-cond"),
      (["--network", pkl, "--grid", "g.png", "--prompt", "a cat"], "--prompts / --prompt: the model is not text-cond"),
      (["--network", pkl, "--grid", "g.png", "--guidance", "7.5"], "--guidance: the model is not text-conditioned"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit) as info:
      sample.main(argv + ["--noprogress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_fid_calc_of_an_sd_student_equals_sampling_to_pngs_then_calc(student_dir, captions_csv, tmp_path, capsys,
                                                                      monkeypatch):
  """`fid calc --student --prompts --metrics=fid,clip` samples once and scores seed i's image against
  caption i: the same numbers as writing the PNGs and scoring the folder (sorted order = seed order)."""
  import json  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import __main__ as fid_main  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import commands, metrics  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import detector as detector_lib  # pylint: disable=g-import-not-at-top
  inception = detector_lib.random_detector(seed=0, resolution=75)
  monkeypatch.setattr(commands, "_load_detector", lambda path: inception)
  stats = []
  monkeypatch.setattr(metrics, "frechet_distance", lambda *a: stats.append(a) or 0.0)
  config = tmp_path / "open_clip_config.json"
  config.write_text(json.dumps(json.loads((FIXTURES / "clip" / "clip_T1.json").read_text())["open_clip_model_config"]))
  ref = tmp_path / "ref.npz"
  metrics.save_stats(ref, np.zeros(2048), np.eye(2048))
  clip = ["--metrics=fid,clip", f"--clip_model={FIXTURES / 'clip' / 'clip_T1.safetensors'}", f"--clip_config={config}",
          f"--prompts={captions_csv}", f"--ref={ref}", "--batch=8", "--noprogress"]
  assert sample.main(["--student", student_dir, "--seeds", "0-4", "--prompts", captions_csv, "--batch", "8",
                      "--outdir", str(tmp_path / "png"), "--noprogress"]) == 0
  capsys.readouterr()
  codes = [fid_main.main(["calc", f"--images={tmp_path / 'png'}", *clip]),
           fid_main.main(["calc", f"--student={student_dir}", "--num=5", *clip])]
  assert codes == [0, 0]
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4 and all(": 5 images, " in line for line in lines)
  score = lambda line: float(line.split("CLIP score ")[1])
  assert score(lines[0]) == score(lines[2]) and lines[1].endswith("FID 0") and lines[3].endswith("FID 0")
  np.testing.assert_array_equal(stats[0][0], stats[1][0])
  np.testing.assert_array_equal(stats[0][1], stats[1][1])


@pytest.mark.slow
def test_a_trained_sd_student_samples_with_guidance(teacher, captions_csv, tmp_path, capsys, tol):
  """configs/ms_coco.py trains the tiny SD student for two iterations (as tests/test_sd_train.py);
  its checkpoint samples with guidance from the command line, as the teacher's path with the
  student's UNet does."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import ROOT, cli_env  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  flags = [f"--config.teacher={LDM / 'sd_tiny.safetensors'}", f"--config.teacher_arch={LDM / 'sd_tiny.yaml'}",
           "--config.img_resolution=64", "--config.train.batch=4", "--config.train.batch_per_device=1",
           "--config.train.total_kimg=0.008", "--config.train.kimg_per_tick=0.004", "--config.train.checkpoint_ticks=2",
           "--config.train.grid_size=2", f"--config.prompts={captions_csv}"]
  result = subprocess.run([sys.executable, "-m", "sfd_jax.main", "--config=configs/ms_coco.py", f"--workdir={workdir}",
                           *flags], cwd=ROOT, env=cli_env(2, tmp_path / "cache"), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sample.main(["--student", str(workdir), "--prompts", captions_csv, "--seeds", "0-1", "--npz",
                      str(tmp_path / "s.npz"), "--noprogress"]) == 0
  assert "NFE 4 (guidance 7.5" in capsys.readouterr().out  # ms_coco: 4 time points with AFS, 2 NFE per pass
  student = checkpoint.load_student(workdir)
  trained, start = student.variables["params"]["model"], teacher.raw_params["params"]["model"]
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start)))
  params = dict(teacher.raw_params, params=dict(teacher.raw_params["params"], model=student.variables["params"]["model"]))
  latents = sampling.seed_latents(jnp.arange(2), latent_student.latent_shape(teacher.config))
  t_steps = schedules.get_schedule(4, teacher.sigma_min, teacher.sigma_max, "discrete", 1.0, vp=teacher.vp)
  cond, uncond = teacher.encode_text(params, CAPTIONS[:2]), teacher.encode_text(params, ["", ""])
  denoise = lambda x, sigma: teacher.denoise(params, x, sigma, condition=cond, uncondition=uncond, guidance=7.5)
  want = images.to_uint8(np.asarray(jax.jit(lambda z: teacher.decode(params, solvers.sample(
      denoise, z, t_steps, "euler", afs=True)))(latents)))
  got = np.load(tmp_path / "s.npz")["arr_0"]
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a level where float32 rounding falls
