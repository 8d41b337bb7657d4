"""The original scIDiff design's usage examples, run as written with ``scidiff`` as the import
name and real data (Kang IFN-beta PBMCs, 2,000 highly variable genes) in place of "your data
loader". The README shows the same code."""
import textwrap

import pytest


@pytest.fixture(scope="module")
def loaders(kang_path):
    import scidiff

    cells = scidiff.setup_anndata(kang_path, n_top_genes=2000, condition_keys=["cell_type", "condition"])
    train_cells, val_cells = cells.split(val_fraction=0.1, seed=0)
    return cells, train_cells.loader(batch_size=256), val_cells.loader(batch_size=256, shuffle=False)


def test_basic_usage(loaders):
    _, train_loader, _ = loaders
    import torch
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    # Initialize model
    model = ScIDiffModel(
        gene_dim=2000,
        hidden_dim=512,
        num_layers=6,
        num_timesteps=1000
    )

    # Train the model
    trainer = ScIDiffTrainer(model, train_loader)
    trainer.train(num_epochs=100)

    # Generate samples
    samples = model.sample(batch_size=16)

    assert samples.shape == (16, 2000) and torch.isfinite(samples).all()
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]


def test_basic_training(loaders):
    _, train_loader, val_loader = loaders
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer
    import torch

    # Create model
    model = ScIDiffModel(gene_dim=2000, hidden_dim=512)

    # Setup training
    trainer = ScIDiffTrainer(
        model=model,
        train_loader=train_loader,
        val_loader=val_loader,
        device='cuda'
    )

    # Train
    trainer.train(num_epochs=100)

    assert trainer.best_val < trainer.history[0]["val_loss"]


def test_configuration(tmp_path, loaders):
    """The original default.yaml keys load, and a model and trainer are built from them."""
    cells, train_loader, _ = loaders
    path = tmp_path / "default.yaml"
    path.write_text(textwrap.dedent("""
        # config/default.yaml
        model:
          gene_dim: 2000
          hidden_dim: 512
          num_layers: 6
          num_timesteps: 1000
          conditioning_dim: 128

        training:
          batch_size: 32
          learning_rate: 1e-4
          num_epochs: 100
          gradient_clip_val: 1.0

        data:
          dataset_path: "data/processed/dataset.h5ad"
          batch_key: "batch"
          cell_type_key: "cell_type"
        """))
    from scidiff.config import load_config
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    config = load_config(path)
    assert config.training.learning_rate == 1e-4 and config.model.conditioning_dim == 128
    assert config.data.all_condition_keys() == ["cell_type", "batch"]
    m = config.model
    model = ScIDiffModel(gene_dim=m.gene_dim, hidden_dim=m.hidden_dim, num_layers=m.num_layers,
                         num_timesteps=m.num_timesteps, conditioning_dim=m.conditioning_dim)
    trainer = ScIDiffTrainer(model, train_loader, learning_rate=config.training.learning_rate,
                             gradient_clip_val=config.training.gradient_clip_val, progress=False)
    assert trainer.optimizer.param_groups[0]["weight_decay"] >= 0 and trainer.gradient_clip_val == 1.0


def test_custom_noise_schedule_and_evaluation(loaders):
    cells, train_loader, _ = loaders
    from scidiff.models.noise_scheduler import BiologicalNoiseScheduler
    from scidiff.models import ScIDiffModel
    from scidiff.evaluation import evaluate_generation_quality

    # Use biological noise schedule
    scheduler = BiologicalNoiseScheduler(
        num_timesteps=1000,
        sparsity_factor=0.8
    )

    model = ScIDiffModel(
        gene_dim=2000,
        noise_scheduler=scheduler
    )
    assert model.scheduler is scheduler

    real_expression = cells.log_expression()[:300]
    generated_expression = cells.log_expression()[300:600]
    cell_types = cells.obs["cell_type"].to_numpy()[:300]

    # Evaluate generated samples
    metrics = evaluate_generation_quality(
        real_data=real_expression,
        generated_data=generated_expression,
        cell_types=cell_types
    )

    print(f"FID Score: {metrics['fid']:.3f}")
    print(f"Gene Correlation: {metrics['gene_correlation']:.3f}")
    assert metrics["gene_correlation"] > 0.5
