"""`mpq-lm-eval`: lm-eval's own command line, with the `mpq-jax` model registered first.

    mpq-lm-eval --model mpq-jax --model_args path=runs/x/model \
        --include_path ../shared/data/tasks/lm_eval --tasks local_tasks --limit 100

Every argument is lm-eval's. lm-eval 0.4.13 finds models only in its own source tree; the
package also declares the `lm_eval.models` entry point (`mpq-jax`), which lm-eval releases
that load model plugins (EleutherAI/lm-evaluation-harness#4013) pick up, so that plain
`lm_eval --model mpq-jax` works there. This command works with either.
"""

from __future__ import annotations


def main() -> None:
    import mpq_jax.eval.harness  # noqa: F401  (registers the "mpq-jax" model)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
