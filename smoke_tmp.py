import time, ray, numpy as np, tempfile, os, logging
import pyarrow.parquet as pq
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, object_store_memory=300*1024**2, configure_logging=False)
import ray.data
ray.data.DataContext.get_current().enable_progress_bars = False
import sys; sys.path.insert(0, "tests")
from test_data import fineweb_table
from mythos_platform.config import DataConfig
from mythos_platform.data import build_datasets
from mythos.tokenizer import ByteTokenizer
d = tempfile.mkdtemp(); pq.write_table(fineweb_table(400), d + "/a.parquet")
for i in range(2):
    t = time.time()
    ds = ray.data.read_parquet(d + "/a.parquet", num_cpus=0.25)
    print("plan", time.time()-t); t=time.time()
    print(ds.count(), "count", time.time()-t)
    t=time.time()
    cfg = DataConfig(source="fineweb", paths=[d + "/*.parquet"], min_score=3.0, seq_len=47, val_fraction=0.2, val_blocks=None)
    tr, va = build_datasets(cfg, ByteTokenizer()); print("build", time.time()-t); t=time.time()
    tr.take_all(); print("take", time.time()-t)
ray.shutdown()
