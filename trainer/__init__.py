"""The bundled video→music trainer: data.py streams shards, model.py is the model, train.py the loop.

Entry points: `trainer.train.main(argv)` and `trainer.generate.main(argv)`.
"""
