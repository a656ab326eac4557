"""What the tests share: real servers on loopback, labs built from them, and small helpers.

- sshd: real OpenSSH hosts (`SshdHost`), the client key, `write_known_hosts`, the test login.
- gitrepo / githttp: bare origin repositories built with pygit2; git's smart-HTTP server.
- healthservers: `HealthServer` (switchable answers, or following the live release's
  `Behaviour`: status, delay, fail after / for N seconds live), a real Prometheus fixture.
- daemonfixtures: the daemon's TOML config (`DaemonSpec`), the daemon in-process
  (`start_daemon`) or as a `deployd run` subprocess (`DaemonProcess`), its REST client.
- judging: `Lab`, one app on N local hosts with release-following health (make_lab).
- daemonlab: one app's `World` on N sshd hosts (daemon_lab); host layout readers.
- rescuelab: `RescueLab`, an origin served over SSH, sshd hosts, health, for rescue jobs.
- hostfixtures: sshd host pools for the host, release and fleet tests (lab_factory, pool).
- waiting: `eventually` / `wait_until` / `wait_until_blocking` (a check, a deadline) and
  `wait_event` (the daemon's timeline).
- metrics: /metrics scraped and parsed (`scrape`, `sample`, `series`, `metric_value`).
- postgres: a throwaway PostgreSQL cluster and databases (`pg_database`).
- nodes: several `deployd run` nodes on one database (`NodeProcess`, `node_process`, owners);
  nodespecs: node configs and in-process nodes (`node_spec`, `start_node`, `wait_owners`).
- net: `free_port`, `wait_http`.  processes: `stop_process` (terminate, then kill).
"""
