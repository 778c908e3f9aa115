"""Fine-tuning with Lightning and Hydra: config schemas, the LightningModule, the removal callback, hardware,
loggers, train(cfg), pretraining of the built-in family and removal without fine-tuning."""
