"""The offline checks behind docs/skypilot_managed_jobs.md (SkyPilot 0.14.1, no server, no cloud):
run with the [sky] extra under an isolated HOME and SKY_RUNTIME_DIR to see the SDK as the notes describe it."""
import sky, inspect
from sky.utils import dag_utils
from sky import jobs
print("jobs.launch", inspect.signature(jobs.launch))
print("jobs.queue", inspect.signature(jobs.queue))
print("jobs.queue_v2", inspect.signature(jobs.queue_v2))
print("jobs.cancel", inspect.signature(jobs.cancel))
print("jobs.tail_logs", inspect.signature(jobs.tail_logs))
print("jobs.download_logs", inspect.signature(jobs.download_logs))
print("jobs.wait", inspect.signature(jobs.wait))
print("Task.__init__ has secrets:", 'secrets' in inspect.signature(sky.Task.__init__).parameters)
t = sky.Task(name="qlora-x", run="python3 runner.py --resume auto", envs={"QLORA_RUN_ID": "r1"},
             secrets={"QLORA_S3_SECRET_KEY": "SUPERSECRET"})
t.set_resources(sky.Resources(infra="aws/us-east-1", instance_type="g5.xlarge", accelerators={"A10G": 1},
                              use_spot=True, disk_size=100,
                              job_recovery={"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 2}))
t.set_storage_mounts({"/ckpt": sky.Storage(source="s3://my-ckpt-bucket", mode=sky.StorageMode.MOUNT)}) if hasattr(sky, "StorageMode") else None
print("required features:", t.get_required_cloud_features())
dag = dag_utils.convert_entrypoint_to_dag(t)
s = dag_utils.dump_dag_to_yaml_str(dag)
print("plaintext secret in dump_dag_to_yaml_str:", "SUPERSECRET" in s)
s2 = dag_utils.dump_dag_to_yaml_str(dag, use_user_specified_yaml=True)
print("plaintext secret in user-specified (redacted) dump:", "SUPERSECRET" in s2, "<redacted>" in s2)
dag_utils.fill_default_config_in_dag_for_job_launch(dag)
print("job_recovery after fill:", list(dag.tasks[0].resources)[0].job_recovery)
r = list(dag.tasks[0].resources)[0]
print("cost/h", r.get_cost(3600))
t2 = sky.Task(run="true"); t2.set_resources(sky.Resources(infra="aws", job_recovery="FAILOVER"))
dag2 = dag_utils.convert_entrypoint_to_dag(t2); dag_utils.fill_default_config_in_dag_for_job_launch(dag2)
print("string job_recovery ->", list(dag2.tasks[0].resources)[0].job_recovery)
t3 = sky.Task(run="true")
dag3 = dag_utils.convert_entrypoint_to_dag(t3); dag_utils.fill_default_config_in_dag_for_job_launch(dag3)
print("no job_recovery ->", list(dag3.tasks[0].resources)[0].job_recovery)
print(s[:900])
