"""``remoterl demo``: train PPO on remote CartPole envs and show where the steps ran.

With nothing else running it starts the embedded broker and two local workers;
``--broker URL`` uses a real broker and the workers attached to it. Stable-Baselines3
trains unchanged: ``make_vec_env`` returns a VecEnv whose envs are remote slots,
stepped with one message per worker per step.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["run_demo"]

# PPO hyperparameters for CartPole-v1 (rl-baselines3-zoo's, with a fixed learning rate):
# 60k steps reach the maximum return of 500 on 2 cores in well under two minutes.
PPO_KWARGS: dict[str, Any] = dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                                  ent_coef=0.0, learning_rate=1e-3, clip_range=0.2)


def run_demo(*, broker: str | None = None, env_id: str = "CartPole-v1", timesteps: int = 60_000,
             n_envs: int = 8, seed: int = 0, eval_episodes: int = 20, num_workers: int = 2,
             echo: Any = print) -> dict:
    """Train, evaluate and report; returns the figures it printed.

    Raises:
        ImportError: Stable-Baselines3 is not installed (``pip install "remoterl[sb3]"``).
    """
    try:
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.evaluation import evaluate_policy
    except ImportError as exc:
        raise ImportError('remoterl demo needs Stable-Baselines3: pip install "remoterl[sb3]"') from exc
    from tqdm import tqdm

    import remoterl
    from remoterl.client.status import fetch_status

    torch.set_num_threads(1)  # a tiny MLP: threads only add contention on a small machine
    settings = remoterl.init(broker=broker, num_workers=num_workers)
    assert settings is not None
    status_url = settings.children_broker
    where = f"broker {broker}" if broker else f"an embedded broker with {num_workers} local workers"
    echo(f"remoterl demo: PPO on {n_envs} remote {env_id} envs through {where}")
    try:
        env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
        workers = getattr(env.unwrapped, "workers", [])
        echo(f"  {n_envs} envs on {len(set(workers))} worker(s), one message per worker per step")

        class Progress(BaseCallback):
            def __init__(self) -> None:
                super().__init__()
                self.bar = tqdm(total=timesteps, unit="step", desc="training", dynamic_ncols=True)

            def _on_step(self) -> bool:
                self.bar.update(self.training_env.num_envs)
                episodes = self.model.ep_info_buffer
                if episodes:
                    mean = sum(e["r"] for e in episodes) / len(episodes)
                    self.bar.set_postfix(episode_reward=f"{mean:.1f}", refresh=False)
                return True

            def _on_training_end(self) -> None:
                self.bar.close()

        model = PPO("MlpPolicy", env, seed=seed, verbose=0, **PPO_KWARGS)
        start = time.perf_counter()
        model.learn(total_timesteps=timesteps, callback=Progress())
        train_seconds = time.perf_counter() - start
        mean_reward, std_reward = evaluate_policy(model, env, n_eval_episodes=eval_episodes, deterministic=True)
        env.close()
        report = {"timesteps": timesteps, "train_seconds": train_seconds,
                  "steps_per_second": timesteps / train_seconds,
                  "mean_reward": float(mean_reward), "std_reward": float(std_reward), "workers": []}
        # Workers report their env-step counts with each heartbeat: wait for the latest (bounded).
        deadline = time.monotonic() + 3.0
        snap = fetch_status(status_url)
        while time.monotonic() < deadline and sum(w.get("stats", {}).get("steps", 0) for w in snap["workers"]) < timesteps:
            time.sleep(0.2)
            snap = fetch_status(status_url)
        echo(f"trained {timesteps:,} steps in {train_seconds:.1f} s ({report['steps_per_second']:,.0f} env steps/s "
             f"including PPO updates)")
        echo("where the steps ran:")
        for worker in snap["workers"]:
            steps = worker.get("stats", {}).get("steps", 0)
            report["workers"].append({"name": worker.get("name"), "steps": steps, "calls": worker.get("calls")})
            echo(f"  worker {worker.get('name')} (pid {worker.get('pid')}): {steps:,} env steps in "
                 f"{worker.get('calls', 0):,} batched calls")
        verdict = "solved" if mean_reward >= 195 else "not solved yet (try more --timesteps)"
        echo(f"evaluation over {eval_episodes} episodes: mean reward {mean_reward:.1f} ± {std_reward:.1f} ({verdict})")
        return report
    finally:
        remoterl.shutdown()
