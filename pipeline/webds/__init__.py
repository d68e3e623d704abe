"""The one WebDataset sample format, the tar shard writer, the index, verify and takedown."""
