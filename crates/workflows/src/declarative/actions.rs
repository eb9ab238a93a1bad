//! The actions a workflow file's steps call: each a typed call with its parameters checked
//! when the file is loaded (names, and the type of every parameter that holds no expression)
//! and again when it runs.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapters::kube::{Kube, ObjectId, Workload, WorkloadKind};
use crate::adapters::step_err;
use crate::connections::Connections;
use dayshift_engine::{RetryPolicy, StepCtx, StepError};

/// One parameter of an action.
pub(crate) struct Param {
    pub name: &'static str,
    pub required: bool,
    /// The JSON type its value must have: "string", "integer", "object", "any".
    pub kind: &'static str,
    pub description: &'static str,
    /// It chooses what the action acts on (a namespace, a name): it may read only guarded
    /// inputs, so that an API caller picks only what the policy allows.
    pub target: bool,
}

const fn param(name: &'static str, required: bool, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        required,
        kind,
        description,
        target: false,
    }
}

const fn target(name: &'static str, required: bool, description: &'static str) -> Param {
    target_of(name, required, "string", description)
}

const fn target_of(name: &'static str, required: bool, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        required,
        kind,
        description,
        target: true,
    }
}

const KUBE_CONNECTION: Param = param(
    "connection",
    false,
    "string",
    "A cluster of connections.kubernetes, by name. Default `default`.",
);
const API_VERSION: Param = param(
    "api-version",
    true,
    "string",
    "The kind's API version: `v1`, `apps/v1`, `external-secrets.io/v1beta1`.",
);
const KIND: Param = param(
    "kind",
    true,
    "string",
    "The kind: `ConfigMap`, `ExternalSecret`, `Certificate`.",
);
const NAMESPACE: Param = target("namespace", false, "The namespace (none for a cluster-wide kind).");
const NAME: Param = target("name", true, "The object's name.");
const WORKLOAD_KIND: Param = param(
    "kind",
    false,
    "string",
    "`Deployment` (default), `StatefulSet` or `DaemonSet`.",
);
const WORKLOAD_NAMESPACE: Param = target("namespace", true, "The workload's namespace.");
const WORKLOAD_NAME: Param = target("name", true, "The workload's name.");
const ARGO_NAMESPACE: Param = target(
    "namespace",
    false,
    "The Application's namespace (where ArgoCD keeps Applications). Default `argocd`.",
);
const ARGO_NAME: Param = target("name", true, "The Application's name.");
const VAULT_CONNECTION: Param = param("connection", true, "string", "A Vault of connections.vault, by name.");
const KV_MOUNT: Param = target("mount", false, "The KV v2 mount. Default `secret`.");
const KV_PATH: Param = target("path", true, "The entry's path: `apps/shop/db`.");

const GIT_CONNECTION: Param = param(
    "connection",
    true,
    "string",
    "A repository of connections.git, by name.",
);
const GIT_PUSHED_TO: Param = target("branch", true, "The branch the commit is pushed to.");
const GIT_FROM: Param = target(
    "from",
    false,
    "The branch `branch` is started from when it does not exist yet.",
);

/// An action of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Records a message (and any data) as the step's output. Changes nothing.
    Log,
    /// Posts a notice to a chat webhook the config names (`connections.notify`).
    Notify,
    /// Reads one object.
    KubeGet,
    /// Sets annotations on one object.
    KubeAnnotate,
    /// Restarts a workload's pods, as `kubectl rollout restart`.
    KubeRestart,
    /// Sets a workload's replicas.
    KubeScale,
    /// Checks that an object has a condition; a check that fails is retried, paced.
    KubeWait,
    /// Fails the run unless a condition holds.
    Assert,
    /// Lists objects of a kind.
    KubeList,
    /// Deletes one object.
    KubeDelete,
    /// A JSON merge patch of one object.
    KubePatch,
    /// Starts an ArgoCD sync of one Application.
    ArgoSync,
    /// Checks that an ArgoCD Application is Synced and Healthy; retried, paced.
    ArgoWaitHealthy,
    /// An instant query to a Prometheus the config names.
    PromQuery,
    /// Runs an image to completion as a Kubernetes Job.
    KubeJob,
    /// Runs a command in a running pod's container.
    KubeExec,
    /// Asks cert-manager to issue a Certificate again, as `cmctl renew` does.
    CertRenew,
    /// Reads the clock once.
    TimeNow,
    /// A request to an HTTP API the config names.
    HttpRequest,
    /// Reads a Vault KV v2 entry.
    VaultKvRead,
    /// Writes a Vault KV v2 entry with check-and-set.
    VaultKvWrite,
    /// A read-only query on a PostgreSQL database the config names.
    PgQuery,
    /// Creates or updates one object by server-side apply.
    KubeApply,
    /// Reads the end of a pod's log.
    KubeLogs,
    /// Generates a secret into a Vault KV v2 entry, with check-and-set.
    VaultKvGenerate,
    /// Reads a value (or a file) from a branch of a git repository the config names.
    GitRead,
    /// Sets values in a YAML file, keeping its format, and pushes one commit.
    GitSetValues,
    /// Writes a whole file and pushes one commit.
    GitWriteFile,
    /// Reverts a commit and pushes.
    GitRevert,
    /// Opens a pull (merge) request on the repository's forge.
    GitPullRequest,
    /// Waits until a pull request is merged; retried, paced.
    GitWaitMerged,
}

impl Action {
    pub(crate) const ALL: [Action; 31] = [
        Action::Log,
        Action::Notify,
        Action::KubeGet,
        Action::KubeAnnotate,
        Action::KubeRestart,
        Action::KubeScale,
        Action::KubeWait,
        Action::Assert,
        Action::KubeList,
        Action::KubeDelete,
        Action::KubePatch,
        Action::ArgoSync,
        Action::ArgoWaitHealthy,
        Action::PromQuery,
        Action::KubeJob,
        Action::KubeExec,
        Action::CertRenew,
        Action::TimeNow,
        Action::HttpRequest,
        Action::VaultKvRead,
        Action::VaultKvWrite,
        Action::PgQuery,
        Action::KubeApply,
        Action::KubeLogs,
        Action::VaultKvGenerate,
        Action::GitRead,
        Action::GitSetValues,
        Action::GitWriteFile,
        Action::GitRevert,
        Action::GitPullRequest,
        Action::GitWaitMerged,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Notify => "notify",
            Action::KubeGet => "kubernetes.get",
            Action::KubeAnnotate => "kubernetes.annotate",
            Action::KubeRestart => "kubernetes.restart",
            Action::KubeScale => "kubernetes.scale",
            Action::KubeWait => "kubernetes.wait",
            Action::Assert => "assert",
            Action::KubeList => "kubernetes.list",
            Action::KubeDelete => "kubernetes.delete",
            Action::KubePatch => "kubernetes.patch",
            Action::ArgoSync => "argocd.sync",
            Action::ArgoWaitHealthy => "argocd.wait-healthy",
            Action::PromQuery => "prometheus.query",
            Action::KubeJob => "kubernetes.job",
            Action::KubeExec => "kubernetes.exec",
            Action::CertRenew => "cert-manager.renew",
            Action::TimeNow => "time.now",
            Action::HttpRequest => "http.request",
            Action::VaultKvRead => "vault.kv-read",
            Action::VaultKvWrite => "vault.kv-write",
            Action::PgQuery => "postgres.query",
            Action::KubeApply => "kubernetes.apply",
            Action::KubeLogs => "kubernetes.logs",
            Action::VaultKvGenerate => "vault.kv-generate",
            Action::GitRead => "git.read",
            Action::GitSetValues => "git.set-values",
            Action::GitWriteFile => "git.write-file",
            Action::GitRevert => "git.revert",
            Action::GitPullRequest => "git.pull-request",
            Action::GitWaitMerged => "git.wait-merged",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// What it does, and why running it again is safe.
    pub(crate) fn description(self) -> &'static str {
        match self {
            Action::Log => {
                "Records `message` (and `data`) as the step's output; changes nothing, so repeating it is harmless."
            }
            Action::Notify => {
                "Posts `text` to the chat webhook `connection` names (connections.notify). A retry after a lost answer \
                 may post the notice twice; nothing else changes."
            }
            Action::KubeGet => {
                "Reads one object: output `found` (false if it does not exist), `object`, and `value`, the value at \
                 `field` (a dotted path such as `status.conditions`), if given. Changes nothing."
            }
            Action::KubeAnnotate => {
                "Sets `annotations` on one object with a merge patch (a value of null removes one): output \
                 `annotations`, the object's annotations after it. Setting the same values again changes nothing."
            }
            Action::KubeRestart => {
                "Restarts a workload's pods as `kubectl rollout restart` does, stamping the pod template with the \
                 run and step: a repeat stamps the same value, so it restarts the pods once. Output `restarted`."
            }
            Action::KubeScale => {
                "Sets a Deployment's or StatefulSet's `replicas`: output `replicas` and `previous`, what it asked for \
                 before (for an undo). Setting the same count again changes nothing."
            }
            Action::KubeWait => {
                "Checks that one object has the status condition `condition` (default `Ready`; none when `field` is \
                 given) at `status` (default `True`) and, with `field` and `changed-from`, a value at `field` other than `changed-from` (a refresh \
                 done since), or with `field` and `equals`, that value (`status.phase` `completed`; a value of \
                 `fails-on` fails the step at once). Each attempt is one check; one that finds it not so is retried by the step's `retry` \
                 (default: every 10s for 10 minutes), the run holding no worker in between. Output `condition`, the \
                 condition as found. Changes nothing."
            }
            Action::KubeList => {
                "Lists the objects of a kind in `namespace` (every namespace without it) matching `labels`, at most \
                 `limit` (default 500): output `items` (each object) and `names`. Changes nothing."
            }
            Action::KubePatch => {
                "Changes one object with a JSON merge patch (`patch`: the fields to set, null removes one): uncordon a \
                 node (`spec: { unschedulable: false }`), label an object, start an ArgoCD sync (`operation`). Output \
                 `object`, the object after it. The same patch again changes nothing more."
            }
            Action::KubeDelete => {
                "Deletes one object (its dependents in the background, as `kubectl delete`): output `deleted`, false if \
                 it was already gone, so repeating it is harmless."
            }
            Action::ArgoSync => {
                "Starts a sync of one ArgoCD Application, as `argocd app sync` does: it sets the Application's \
                 `operation` (initiated by `dayshift`, marked with the run and step), which the application controller \
                 carries out. A sync already started by this step (still pending, or finished) is not started again; \
                 while another operation runs, the step is retried. Output `started` (false when it had been) and \
                 `marker`."
            }
            Action::ArgoWaitHealthy => {
                "Checks that one ArgoCD Application has no operation running and is Synced (at `revision`, if given) \
                 and Healthy. Each attempt is one read; one that finds it not so is retried by the step's `retry` \
                 (default: every 10s for 10 minutes), the run holding no worker in between. A sync that ended Failed \
                 or in Error fails the step at once, with ArgoCD's message. Output `sync`, `health` and `revision`. \
                 Changes nothing."
            }
            Action::PromQuery => {
                "Evaluates the PromQL instant query `query` on the Prometheus `connection` names \
                 (connections.prometheus): output `series`, one `{labels, value}` per series (a scalar gives one), \
                 `count`, the number of series, and `value`, the value when there is exactly one series (null \
                 otherwise). A gate reads it (`that: ${{ steps.firing.count == 0 }}`), a digest lists it. A query \
                 that does not parse fails the step at once; an unreachable Prometheus is retried. Reads only, so \
                 repeating it is harmless (the answer may differ: the step keeps the one it got)."
            }
            Action::KubeJob => {
                "Runs `image` to completion as a Job in `namespace` (the escape hatch for what dayshift has no action \
                 for: `mysqldump`, `occ`, `mmctl`, `redis-cli`), with `command`, `args`, `env` and `secret-env` (values \
                 the kubelet reads from Secrets, so they never pass through dayshift); the container also gets \
                 `DAYSHIFT_RUN_ID` and `DAYSHIFT_STEP`. Each attempt is one look at the Job, the run holding no worker \
                 while it runs (default: every 10s for an hour). The Job is named `<name>-<8 hex digits of the run and \
                 step>`, so a repeat finds the Job it started instead of starting another. Once it ends, the step reads \
                 its exit code and the tail of its log and deletes it; a Job that failed fails the step with its log. \
                 Output `job`, `succeeded`, `exit_code` and `logs`. A repeat after the Job was collected but before the \
                 step was recorded runs it again, so its command must be safe to run twice (a dump to a key of the run)."
            }
            Action::KubeExec => {
                "Runs `command` in a container of a running pod, as `kubectl exec` does (no stdin, no TTY): the pod \
                 named `pod`, or the first Running one, by name, matching `labels` (none running is retried: it may be \
                 restarting). Output `pod`, `exit_code`, `stdout` and `stderr` (the last 64 KiB of each). A command that \
                 exits non-zero fails the step at once, with its stderr. A retry after a lost connection runs the \
                 command again, so it must be safe to repeat (`occ maintenance:mode --on` is)."
            }
            Action::CertRenew => {
                "Asks cert-manager to issue one Certificate again, as `cmctl renew` does: it sets the Certificate's \
                 `Issuing` condition (reason `ManuallyTriggered`), which cert-manager answers with a new certificate. \
                 A Certificate already issuing is left as it is (output `renewing: false`), so a repeat while it \
                 issues changes nothing; a repeat after the new certificate was issued asks for one more. Output \
                 `renewing` and `revision`, the revision being replaced."
            }
            Action::TimeNow => {
                "Reads the clock once: output `time` (UTC, RFC 3339) and `unix` (seconds). The value is journaled, so \
                 every replay of the run, and every expression after it, sees the same instant \
                 (`timestamp(c.status.notAfter) - timestamp(steps.now.time) < duration('336h')`). Changes nothing."
            }
            Action::HttpRequest => {
                "Sends `method` (default GET) to `path` below the base URL of the HTTP API `connection` names \
                 (connections.http), with `query`, `headers` and a JSON `body`; the connection adds its credentials, \
                 which a step's headers cannot replace, and no request leaves its URL. An answer with a status in \
                 `expect` (default any 2xx) is the output: `status` and `json` (or `text`, for a body that is not \
                 JSON). 429 and 5xx answers and network errors are retried, others fail the step. A GET is safe to \
                 repeat; a retried POST may be sent twice, so give the API an idempotency key if it takes one. A step \
                 whose answer holds a secret is `sensitive: true`."
            }
            Action::VaultKvRead => {
                "Reads the current version of the KV v2 entry at `path` of `mount` (default `secret`) on the Vault \
                 `connection` names: output `version`, `keys`, and `data`, the keys and values (with `values: false`, \
                 only the version and the keys). Its values are secrets, so a step that reads them must be \
                 `sensitive: true` (its output is never journaled; a replay reads again). Changes nothing."
            }
            Action::VaultKvWrite => {
                "Writes `data` as the next version of the KV v2 entry at `path` of `mount` (default `secret`), only if \
                 its current version is still `cas` (check-and-set; 0 creates it): output `version`, the new one. \
                 If another writer was first, the step fails without writing. A repeat after a lost answer finds its \
                 own write (the version after `cas`, with the same data) and succeeds without writing again."
            }
            Action::PgQuery => {
                "Runs the query `sql` (a SELECT, VALUES or WITH … SELECT, as one statement) on the PostgreSQL database \
                 `connection` names, with `params` bound as $1, $2, …, in a read-only transaction with a 30 s \
                 statement timeout: output `rows` (each a JSON object of its columns, at most `limit`, default 100) \
                 and `count`. A check (`that: ${{ steps.lag.rows[0].seconds < 60 }}`), a digest line. A query that \
                 fails says its SQLSTATE, not the server's message (it may quote data). Give the connection a role \
                 that can only read: a read-only transaction still runs functions such as pg_terminate_backend."
            }
            Action::KubeApply => {
                "Creates or updates the object `manifest` (apiVersion, kind, metadata.name, metadata.namespace for a \
                 namespaced kind) by server-side apply, as field manager `dayshift`: the fields it gives are set, \
                 the others left to their owners, and a field dayshift applied before and no longer gives is removed. \
                 Applying the same manifest again changes nothing, so repeating it is harmless. Output `object`, the \
                 object as the server has it. A CNPG `Backup`, a drill namespace's NetworkPolicy, a Velero `Backup`. \
                 Or, instead of `manifest`, the objects at `path` on `branch` of the git `repository`: a file (every \
                 document), a directory (its `.yaml` files in name order) or a kustomize directory (rendered by \
                 `kubectl kustomize`), applied in order; output `applied` (each `Kind namespace/name`) and `commit`."
            }
            Action::KubeLogs => {
                "Reads the last `lines` lines (default 100, at most 5000) of a container's log in a pod: the pod named \
                 `pod`, or the first one, by name, matching `labels`; with `previous: true`, the log of its previous \
                 instance (the one that crashed). Output `pod` and `logs`. Logs are journaled with the run: read them \
                 from workloads that do not print secrets. Changes nothing."
            }
            Action::VaultKvGenerate => {
                "Generates a new secret (`length` characters, default 32, of `alphabet`: `alphanumeric`, `urlsafe` or \
                 the characters given) and writes it under `key` of the KV v2 entry at `path`, the entry's other keys \
                 kept, only if the entry is still at version `cas` (check-and-set): output `version`, the new one, \
                 never the secret. The secret is made once: a repeat after a lost answer finds the version after `cas` \
                 and succeeds without making another, so the steps after it read the one stored (`vault.kv-read`, \
                 `sensitive: true`) on every replay. The way to rotate a credential: store it first, then hand it out."
            }
            Action::GitRead => {
                "Reads `key` (a path such as `image.tag` or `services[name=api].image`) of the YAML file `file` on \
                 `branch` of a repository of connections.git: output `value` and `commit`; without `key`, the whole \
                 file as `text`. Reads only."
            }
            Action::GitSetValues => {
                "Sets each key of `values` in the YAML file `file` on `branch`, keeping the file's comments, quoting \
                 and order (only the values' text changes; a change that would alter anything else is refused), as \
                 one commit pushed to `branch`. With `from`, a `branch` that does not exist yet is started from \
                 `from` (the branch a pull request is then opened from). Output `commit`, `changed` (false when \
                 every value was set already: no commit), `lines`, `branch` and `created`. Safe to repeat: the \
                 commit carries `Dayshift-Step: <run>/<step>` and a repeat finds it instead of committing again; a \
                 branch that moved meanwhile gets the edit again on its new tip. Never force-pushes."
            }
            Action::GitWriteFile => {
                "Writes `content` as the whole of `file` on `branch` (created, or replaced) as one commit pushed to \
                 `branch`; with `from`, a `branch` that does not exist yet is started from `from`. A `.yaml` or \
                 `.yml` file's content must be valid YAML. For a new manifest in an application's directory; to \
                 change values in a file that exists, `git.set-values` keeps the rest of it. Output `commit`, \
                 `changed` (false when the file held that already: no commit), `branch` and `created`. Safe to \
                 repeat, as `git.set-values` is."
            }
            Action::GitRevert => {
                "Reverts `commit` on `branch` (a `git revert`, its message saying `This reverts commit <id>.`) and \
                 pushes; with `from`, a `branch` that does not exist yet is started from `from`, for a revert \
                 proposed as a pull request. Output `commit`, `reverted` (the full id), `changed`, `branch`, \
                 `created`. Once per commit: a branch whose recent history already reverts it (this step's or \
                 anyone's revert) is left as it is. A commit that is not on the branch, or that does not revert \
                 cleanly, fails the step."
            }
            Action::GitPullRequest => {
                "Opens a pull request (a merge request on GitLab) from `head` to `base` on the forge the git \
                 connection names (`forge:` in its config: GitHub, Gitea, Forgejo or GitLab), with `title`, `body` \
                 and `draft`. Output `number`, `url`, `state` and `created`. Once per branch pair: when one is open \
                 between them already (a repeat, or another writer's), it is the answer and none is opened."
            }
            Action::GitWaitMerged => {
                "Checks that pull request `number` is merged; one still open is checked again, paced (default: \
                 every minute for a day), the run holding no worker meanwhile; one closed without merging fails the \
                 step. Output `merged`, `merge-commit` and `url`. Reads only."
            }
            Action::Assert => {
                "Fails the run (at once, without retries) with `message` unless `that` is true: a check between \
                 steps (`that: ${{ steps.get.found }}`). Output `held: true`. Changes nothing."
            }
        }
    }

    pub(crate) fn params(self) -> &'static [Param] {
        match self {
            Action::Log => {
                const P: &[Param] = &[
                    param("message", true, "string", "The text recorded."),
                    param("data", false, "any", "Any value recorded with it."),
                ];
                P
            }
            Action::Notify => {
                const P: &[Param] = &[
                    param(
                        "connection",
                        true,
                        "string",
                        "A chat webhook of connections.notify, by name.",
                    ),
                    param("text", true, "string", "The notice (Markdown)."),
                ];
                P
            }
            Action::KubeGet => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    API_VERSION,
                    KIND,
                    NAMESPACE,
                    NAME,
                    param(
                        "field",
                        false,
                        "string",
                        "A dotted path into the object whose value is `value`.",
                    ),
                ];
                P
            }
            Action::KubeAnnotate => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    API_VERSION,
                    KIND,
                    NAMESPACE,
                    NAME,
                    param(
                        "annotations",
                        true,
                        "object",
                        "The annotations to set, name to value (null removes one).",
                    ),
                ];
                P
            }
            Action::KubeWait => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    API_VERSION,
                    KIND,
                    NAMESPACE,
                    NAME,
                    param(
                        "condition",
                        false,
                        "string",
                        "The condition's type. Default `Ready`, or none with `field`.",
                    ),
                    param("status", false, "string", "The status it must have. Default `True`."),
                    param(
                        "field",
                        false,
                        "string",
                        "A dotted path into the object that must also have changed.",
                    ),
                    param(
                        "changed-from",
                        false,
                        "any",
                        "With `field`: the value it had before; the wait ends once it differs.",
                    ),
                    param(
                        "equals",
                        false,
                        "any",
                        "With `field`: the value it must reach (`completed`).",
                    ),
                    param(
                        "fails-on",
                        false,
                        "any",
                        "With `equals`: values of `field` that fail the step at once, a list (`[failed]`).",
                    ),
                ];
                P
            }
            Action::KubeList => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    API_VERSION,
                    KIND,
                    target("namespace", false, "The namespace; every namespace without it."),
                    param("labels", false, "string", "A label selector: `app=web,tier!=cache`."),
                    param(
                        "limit",
                        false,
                        "integer",
                        "At most this many objects (1 to 5000). Default 500.",
                    ),
                ];
                P
            }
            Action::KubeDelete => {
                const P: &[Param] = &[KUBE_CONNECTION, API_VERSION, KIND, NAMESPACE, NAME];
                P
            }
            Action::KubePatch => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    API_VERSION,
                    KIND,
                    NAMESPACE,
                    NAME,
                    param(
                        "patch",
                        true,
                        "object",
                        "The merge patch: the fields to set (null removes one).",
                    ),
                ];
                P
            }
            Action::ArgoSync => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    ARGO_NAMESPACE,
                    ARGO_NAME,
                    param(
                        "revision",
                        false,
                        "string",
                        "The revision to sync to (a commit, tag or branch). Default: the Application's target.",
                    ),
                    param(
                        "prune",
                        false,
                        "boolean",
                        "Delete the resources no longer in git. Default false.",
                    ),
                ];
                P
            }
            Action::ArgoWaitHealthy => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    ARGO_NAMESPACE,
                    ARGO_NAME,
                    param(
                        "revision",
                        false,
                        "string",
                        "The revision it must be Synced at (a full commit SHA, as ArgoCD reports it).",
                    ),
                ];
                P
            }
            Action::PromQuery => {
                const P: &[Param] = &[
                    param(
                        "connection",
                        false,
                        "string",
                        "A Prometheus of connections.prometheus, by name. Default `default`.",
                    ),
                    param(
                        "query",
                        true,
                        "string",
                        "The PromQL expression: `ALERTS{alertstate=\"firing\"}`.",
                    ),
                ];
                P
            }
            Action::KubeJob => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    target("namespace", true, "The namespace the Job runs in."),
                    param(
                        "name",
                        true,
                        "string",
                        "The Job's name, before `-<8 hex digits>` (at most 54 characters).",
                    ),
                    target("image", true, "The container image: `mysql:8.4`."),
                    target_of(
                        "command",
                        false,
                        "any",
                        "The command, a list (the image's entrypoint without it).",
                    ),
                    target_of("args", false, "any", "Its arguments, a list."),
                    target_of("env", false, "object", "Environment variables, name to value."),
                    target_of(
                        "secret-env",
                        false,
                        "object",
                        "Environment variables from Secrets of the namespace: name to `<secret>/<key>`.",
                    ),
                    target(
                        "service-account",
                        false,
                        "The service account it runs as; without it, the pod gets no API token.",
                    ),
                    param(
                        "deadline",
                        false,
                        "string",
                        "How long it may run before Kubernetes stops it (`activeDeadlineSeconds`). Default `1h`.",
                    ),
                    param(
                        "log-lines",
                        false,
                        "integer",
                        "How many lines of its log end up in the output (0 to 1000). Default 20.",
                    ),
                ];
                P
            }
            Action::KubeExec => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    target("namespace", true, "The pod's namespace."),
                    target("pod", false, "The pod's name; or give `labels`."),
                    target(
                        "labels",
                        false,
                        "A label selector: the first Running pod matching it, by name (`app=nextcloud`).",
                    ),
                    target(
                        "container",
                        false,
                        "The container; default the pod's only one (or its default container).",
                    ),
                    target_of("command", true, "any", "The command and its arguments, a list."),
                ];
                P
            }
            Action::CertRenew => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    target("namespace", true, "The Certificate's namespace."),
                    target("name", true, "The Certificate's name."),
                ];
                P
            }
            Action::TimeNow => &[],
            Action::GitRead => {
                const P: &[Param] = &[
                    GIT_CONNECTION,
                    target("branch", true, "The branch."),
                    target("file", true, "The file's path in the repository."),
                    param(
                        "key",
                        false,
                        "string",
                        "The value's path: `image.tag`, `services[name=api].image`. Default: the whole file.",
                    ),
                ];
                P
            }
            Action::GitSetValues => {
                const P: &[Param] = &[
                    GIT_CONNECTION,
                    GIT_PUSHED_TO,
                    GIT_FROM,
                    target("file", true, "The YAML file's path in the repository."),
                    param(
                        "values",
                        true,
                        "object",
                        "Each value's path and its new value: `{ image.tag: v1.4.2 }`.",
                    ),
                    param("message", false, "string", "The commit message. Default: what it sets."),
                ];
                P
            }
            Action::GitWriteFile => {
                const P: &[Param] = &[
                    GIT_CONNECTION,
                    GIT_PUSHED_TO,
                    GIT_FROM,
                    target("file", true, "The file's path in the repository."),
                    param("content", true, "string", "The file's whole content."),
                    param(
                        "message",
                        false,
                        "string",
                        "The commit message. Default: `write <file>`.",
                    ),
                ];
                P
            }
            Action::GitRevert => {
                const P: &[Param] = &[
                    GIT_CONNECTION,
                    GIT_PUSHED_TO,
                    GIT_FROM,
                    target("commit", true, "The commit to revert (its id, 7 to 64 hex digits)."),
                    param(
                        "message",
                        false,
                        "string",
                        "The commit's title. Default: `Revert \"<its title>\"`.",
                    ),
                ];
                P
            }
            Action::GitPullRequest => {
                const P: &[Param] = &[
                    GIT_CONNECTION,
                    target("head", true, "The branch with the changes."),
                    target("base", true, "The branch they are proposed for."),
                    param("title", true, "string", "The pull request's title."),
                    param("body", false, "string", "Its description (Markdown)."),
                    param("draft", false, "boolean", "Opened as a draft. Default false."),
                ];
                P
            }
            Action::GitWaitMerged => {
                const P: &[Param] = &[
                    GIT_CONNECTION,
                    param(
                        "number",
                        true,
                        "integer",
                        "The pull request's number (`steps.<id>.number`).",
                    ),
                ];
                P
            }
            Action::VaultKvGenerate => {
                const P: &[Param] = &[
                    VAULT_CONNECTION,
                    KV_MOUNT,
                    KV_PATH,
                    param(
                        "key",
                        true,
                        "string",
                        "The key the secret is written under: `password`.",
                    ),
                    param(
                        "cas",
                        true,
                        "integer",
                        "The version it must still be at (0: it must not exist yet).",
                    ),
                    param("length", false, "integer", "Its length (16 to 1024). Default 32."),
                    param(
                        "alphabet",
                        false,
                        "string",
                        "`alphanumeric` (default), `urlsafe`, or the characters to draw from.",
                    ),
                ];
                P
            }
            Action::KubeApply => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    target_of(
                        "manifest",
                        false,
                        "object",
                        "The object: apiVersion, kind, metadata (name, namespace) and what it sets. Or give `repository` and `path`.",
                    ),
                    target(
                        "repository",
                        false,
                        "A repository of connections.git the objects are read from, instead of `manifest`.",
                    ),
                    target("branch", false, "The repository's branch. Default `main`."),
                    target(
                        "path",
                        false,
                        "A file, a directory of `.yaml` files or a kustomize directory in the repository.",
                    ),
                    target(
                        "namespace",
                        false,
                        "With `path`: the namespace of the namespaced objects that name none.",
                    ),
                ];
                P
            }
            Action::KubeLogs => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    target("namespace", true, "The pod's namespace."),
                    target("pod", false, "The pod's name; or give `labels`."),
                    target("labels", false, "A label selector: the first pod matching it, by name."),
                    target("container", false, "The container; default the pod's only one."),
                    param(
                        "lines",
                        false,
                        "integer",
                        "How many lines, from the end (1 to 5000). Default 100.",
                    ),
                    param(
                        "previous",
                        false,
                        "boolean",
                        "The log of the container's previous instance (the one that crashed).",
                    ),
                ];
                P
            }
            Action::VaultKvRead => {
                const P: &[Param] = &[
                    VAULT_CONNECTION,
                    KV_MOUNT,
                    KV_PATH,
                    param(
                        "values",
                        false,
                        "boolean",
                        "false: only the version and the keys (no secret). Default true.",
                    ),
                ];
                P
            }
            Action::VaultKvWrite => {
                const P: &[Param] = &[
                    VAULT_CONNECTION,
                    KV_MOUNT,
                    KV_PATH,
                    param("data", true, "object", "The entry's keys and values."),
                    param(
                        "cas",
                        true,
                        "integer",
                        "The version it must still be at (0: it must not exist yet).",
                    ),
                ];
                P
            }
            Action::PgQuery => {
                const P: &[Param] = &[
                    param(
                        "connection",
                        true,
                        "string",
                        "A database of connections.postgres, by name.",
                    ),
                    target(
                        "sql",
                        true,
                        "The query: `select now() - pg_last_xact_replay_timestamp() as lag`.",
                    ),
                    param("params", false, "any", "Values bound as $1, $2, …, a list."),
                    param(
                        "limit",
                        false,
                        "integer",
                        "At most this many rows (1 to 1000). Default 100.",
                    ),
                ];
                P
            }
            Action::HttpRequest => {
                const P: &[Param] = &[
                    param(
                        "connection",
                        true,
                        "string",
                        "An HTTP API of connections.http, by name.",
                    ),
                    param(
                        "method",
                        false,
                        "string",
                        "GET (default), HEAD, POST, PUT, PATCH or DELETE.",
                    ),
                    target(
                        "path",
                        false,
                        "The path below the connection's URL: `clients/${{ input.client }}/secret`.",
                    ),
                    param("query", false, "object", "Query parameters, name to value."),
                    param(
                        "headers",
                        false,
                        "object",
                        "Request headers, name to value (not the connection's own).",
                    ),
                    param("body", false, "any", "The JSON body."),
                    param(
                        "expect",
                        false,
                        "any",
                        "The statuses that are an answer, a list (`[200, 404]`). Default any 2xx.",
                    ),
                ];
                P
            }
            Action::Assert => {
                const P: &[Param] = &[
                    param("that", true, "any", "What must be true, usually `${{ expression }}`."),
                    param("message", true, "string", "The run's error when it is not."),
                ];
                P
            }
            Action::KubeRestart => {
                const P: &[Param] = &[KUBE_CONNECTION, WORKLOAD_KIND, WORKLOAD_NAMESPACE, WORKLOAD_NAME];
                P
            }
            Action::KubeScale => {
                const P: &[Param] = &[
                    KUBE_CONNECTION,
                    WORKLOAD_KIND,
                    WORKLOAD_NAMESPACE,
                    WORKLOAD_NAME,
                    param("replicas", true, "integer", "The replicas to ask for (0 to 1000)."),
                ];
                P
            }
        }
    }

    /// The retry policy of a step calling it, when the step gives none: a wait checks every
    /// 10 s for 10 minutes; an assert never retries; the others retry as network calls do.
    pub(crate) fn default_retry(self) -> RetryPolicy {
        match self {
            Action::KubeWait | Action::ArgoWaitHealthy => RetryPolicy {
                max_attempts: 60,
                initial_delay: std::time::Duration::from_secs(10),
                multiplier: 1.0,
                max_delay: std::time::Duration::from_secs(10),
                ..RetryPolicy::network()
            },
            Action::GitWaitMerged => RetryPolicy {
                max_attempts: 1440,
                initial_delay: std::time::Duration::from_secs(60),
                multiplier: 1.0,
                max_delay: std::time::Duration::from_secs(60),
                ..RetryPolicy::network()
            },
            Action::KubeJob => RetryPolicy {
                max_attempts: 360,
                initial_delay: std::time::Duration::from_secs(10),
                multiplier: 1.0,
                max_delay: std::time::Duration::from_secs(10),
                ..RetryPolicy::network()
            },
            _ => RetryPolicy::network(),
        }
    }

    /// Runs it with `params` (the step's `with:`, expressions evaluated).
    pub(crate) async fn run(self, params: Value, connections: &Connections, s: &StepCtx) -> Result<Value, StepError> {
        match self {
            Action::Log => {
                let p: LogParams = parse(self, params)?;
                Ok(json!({ "message": p.message, "data": p.data }))
            }
            Action::Notify => {
                let p: NotifyParams = parse(self, params)?;
                let notifier = connections.notifier(&p.connection).map_err(StepError::permanent)?;
                notifier.send(&p.text).await.map_err(step_err)?;
                Ok(json!({ "sent": true }))
            }
            Action::KubeGet => {
                let p: KubeObjectParams = parse(self, params)?;
                let (kube, r, id) = p.object.resolve(connections).await?;
                let found = kube.get(&r, &id).await.map_err(step_err)?;
                let value = match (&found, &p.field) {
                    (Some(o), Some(f)) => f
                        .split('.')
                        .try_fold(o, |v, k| v.get(k))
                        .cloned()
                        .unwrap_or(Value::Null),
                    _ => Value::Null,
                };
                Ok(json!({ "found": found.is_some(), "object": found, "value": value }))
            }
            Action::KubeAnnotate => {
                let p: KubeAnnotateParams = parse(self, params)?;
                for (k, v) in &p.annotations {
                    if !(v.is_string() || v.is_null()) || k.is_empty() || k.len() > 317 {
                        return Err(StepError::permanent(format!(
                            "action {}: annotation {k:?} must be a name with a string or null value",
                            self.name()
                        )));
                    }
                }
                let (kube, r, id) = p.object.resolve(connections).await?;
                let patch = json!({ "metadata": { "annotations": p.annotations } });
                let patched = kube.merge_patch(&r, &id, &patch).await.map_err(step_err)?;
                Ok(json!({ "annotations": patched["metadata"]["annotations"] }))
            }
            Action::KubeWait => {
                let p: KubeWaitParams = parse(self, params)?;
                let (kube, r, id) = p.object.resolve(connections).await?;
                // With a field to watch, a condition is checked only if one is named.
                let kind = match (&p.condition, &p.field) {
                    (Some(c), _) => Some(c.as_str()),
                    (None, Some(_)) => None,
                    (None, None) => Some("Ready"),
                };
                let want = p.status.as_deref().unwrap_or("True");
                let Some(object) = kube.get(&r, &id).await.map_err(step_err)? else {
                    return Err(StepError::transient(format!("{id} does not exist (yet)")));
                };
                let found = |kind: &str| {
                    object["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|c| c["type"] == kind)
                        .cloned()
                };
                if let (Some(field), Some(before)) = (&p.field, &p.changed_from) {
                    let now = field
                        .split('.')
                        .try_fold(&object, |v, k| v.get(k))
                        .unwrap_or(&Value::Null);
                    if now == before {
                        return Err(StepError::transient(format!("{id}: {field} is still {now}")));
                    }
                }
                if let (Some(field), Some(want)) = (&p.field, &p.equals) {
                    let now = field
                        .split('.')
                        .try_fold(&object, |v, k| v.get(k))
                        .unwrap_or(&Value::Null);
                    if p.fails_on.contains(now) {
                        return Err(StepError::permanent(format!("{id}: {field} is {now}")));
                    }
                    if now != want {
                        return Err(StepError::transient(format!("{id}: {field} is {now}, not {want} yet")));
                    }
                }
                let Some(kind) = kind else {
                    return Ok(json!({ "condition": null }));
                };
                let found = found(kind);
                match found {
                    Some(c) if c["status"] == want => Ok(json!({ "condition": c })),
                    Some(c) => Err(StepError::transient(format!(
                        "{id} is {kind}={} ({}), not {kind}={want}",
                        c["status"].as_str().unwrap_or("?"),
                        c["message"].as_str().or(c["reason"].as_str()).unwrap_or("no message")
                    ))),
                    None => Err(StepError::transient(format!("{id} has no condition {kind} yet"))),
                }
            }
            Action::KubeList => {
                let p: KubeListParams = parse(self, params)?;
                if let Some(ns) = &p.namespace {
                    kube_name("namespace", ns)?;
                }
                let limit = p.limit.unwrap_or(500);
                if !(1..=5000).contains(&limit) {
                    return Err(StepError::permanent(format!(
                        "action {}: limit must be 1 to 5000",
                        self.name()
                    )));
                }
                let kube = cluster(connections, &p.connection).await?;
                let r = kube.resource(&p.api_version, &p.kind).await.map_err(step_err)?;
                let items = kube
                    .list(&r, p.namespace.as_deref(), p.labels.as_deref(), limit)
                    .await
                    .map_err(step_err)?;
                let names: Vec<Value> = items.iter().map(|o| o["metadata"]["name"].clone()).collect();
                Ok(json!({ "items": items, "names": names }))
            }
            Action::KubePatch => {
                let p: KubePatchParams = parse(self, params)?;
                let (kube, r, id) = p.object.resolve(connections).await?;
                let patched = kube
                    .merge_patch(&r, &id, &Value::Object(p.patch))
                    .await
                    .map_err(step_err)?;
                Ok(json!({ "object": patched }))
            }
            Action::KubeDelete => {
                let p: KubeObjectOnly = parse(self, params)?;
                let (kube, r, id) = p.object.resolve(connections).await?;
                Ok(json!({ "deleted": kube.delete(&r, &id).await.map_err(step_err)? }))
            }
            Action::ArgoSync => {
                let p: ArgoSyncParams = parse(self, params)?;
                let (kube, r, id) = p.app.resolve(connections).await?;
                let marker = format!("{}/{}", s.run_id, s.step);
                let Some(app) = kube.get(&r, &id).await.map_err(step_err)? else {
                    return Err(StepError::permanent(format!("there is no ArgoCD Application {id}")));
                };
                let ours = |op: &Value| {
                    op["info"].as_array().is_some_and(|i| {
                        i.iter()
                            .any(|i| i["name"] == "dayshift" && i["value"] == marker.as_str())
                    })
                };
                if ours(&app["operation"]) || ours(&app["status"]["operationState"]["operation"]) {
                    return Ok(json!({ "started": false, "marker": marker }));
                }
                let running = app["status"]["operationState"]["phase"]
                    .as_str()
                    .is_some_and(|p| p == "Running" || p == "Terminating");
                if app["operation"].is_object() || running {
                    return Err(StepError::transient(format!(
                        "another operation is running on Application {id}"
                    )));
                }
                let mut sync = json!({ "prune": p.prune });
                if let Some(rev) = &p.revision {
                    sync["revision"] = json!(rev);
                }
                let patch = json!({ "operation": {
                    "initiatedBy": { "username": "dayshift" },
                    "info": [{ "name": "dayshift", "value": marker }],
                    "sync": sync,
                } });
                kube.merge_patch(&r, &id, &patch).await.map_err(step_err)?;
                Ok(json!({ "started": true, "marker": marker }))
            }
            Action::ArgoWaitHealthy => {
                let p: ArgoWaitParams = parse(self, params)?;
                let (kube, r, id) = p.app.resolve(connections).await?;
                let Some(app) = kube.get(&r, &id).await.map_err(step_err)? else {
                    return Err(StepError::permanent(format!("there is no ArgoCD Application {id}")));
                };
                let status = &app["status"];
                let text = |v: &Value| v.as_str().unwrap_or("Unknown").to_string();
                let (sync, health) = (text(&status["sync"]["status"]), text(&status["health"]["status"]));
                let revision = status["sync"]["revision"].as_str().unwrap_or_default();
                let op = &status["operationState"];
                let phase = op["phase"].as_str().unwrap_or_default();
                if app["operation"].is_object() || phase == "Running" || phase == "Terminating" {
                    return Err(StepError::transient(format!("Application {id}: a sync is running")));
                }
                if phase == "Failed" || phase == "Error" {
                    return Err(StepError::permanent(format!(
                        "Application {id}: the sync ended {phase}: {}",
                        op["message"].as_str().unwrap_or("no message")
                    )));
                }
                let at_revision = p.revision.as_deref().is_none_or(|r| r == revision);
                if sync == "Synced" && health == "Healthy" && at_revision {
                    return Ok(json!({ "sync": sync, "health": health, "revision": revision }));
                }
                let why = status["health"]["message"].as_str().unwrap_or("no message");
                Err(StepError::transient(format!(
                    "Application {id} is {sync} and {health} ({why}) at revision {revision:?}"
                )))
            }
            Action::PromQuery => {
                let p: PromQueryParams = parse(self, params)?;
                let prometheus = connections.prometheus(&p.connection).map_err(StepError::permanent)?;
                let answer = prometheus
                    .query(&p.query, std::time::Duration::from_secs(20))
                    .await
                    .map_err(step_err)?;
                Ok(json!({
                    "series": answer.series, "count": answer.series.len(), "value": answer.value(),
                }))
            }
            Action::GitRead => super::git::read(parse(self, params)?, connections).await,
            Action::GitSetValues => super::git::set_values(parse(self, params)?, connections, s).await,
            Action::GitWriteFile => super::git::write_file(parse(self, params)?, connections, s).await,
            Action::GitRevert => super::git::revert(parse(self, params)?, connections, s).await,
            Action::GitPullRequest => super::git::pull_request(parse(self, params)?, connections).await,
            Action::GitWaitMerged => super::git::wait_merged(parse(self, params)?, connections).await,
            Action::KubeJob => {
                let p: super::job::JobParams = parse(self, params)?;
                let kube = cluster(connections, &p.connection).await?;
                p.run(&kube, s).await
            }
            Action::KubeExec => {
                let p: ExecParams = parse(self, params)?;
                kube_name("namespace", &p.namespace)?;
                if let Some(c) = &p.container {
                    kube_name("container", c)?;
                }
                if p.command.is_empty() {
                    return Err(StepError::permanent("action kubernetes.exec: `command` is empty"));
                }
                let kube = cluster(connections, &p.connection).await?;
                let pod = pick_pod(self, &kube, &p.namespace, &p.pod, &p.labels, true).await?;
                let done = kube
                    .exec(&p.namespace, &pod, p.container.as_deref(), &p.command, 64 * 1024)
                    .await
                    .map_err(step_err)?;
                if done.exit_code != 0 {
                    let why = if done.stderr.trim().is_empty() {
                        &done.stdout
                    } else {
                        &done.stderr
                    };
                    let tail: String = why
                        .trim_end()
                        .chars()
                        .rev()
                        .take(2000)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    return Err(StepError::permanent(format!(
                        "{} in pod {}/{pod} exited {}: {}",
                        p.command[0],
                        p.namespace,
                        done.exit_code,
                        if tail.is_empty() { "no output" } else { &tail }
                    )));
                }
                Ok(json!({ "pod": pod, "exit_code": done.exit_code, "stdout": done.stdout, "stderr": done.stderr }))
            }
            Action::CertRenew => {
                let p: CertParams = parse(self, params)?;
                kube_name("namespace", &p.namespace)?;
                kube_name("name", &p.name)?;
                let kube = cluster(connections, &p.connection).await?;
                let r = kube
                    .resource("cert-manager.io/v1", "Certificate")
                    .await
                    .map_err(step_err)?;
                let id = ObjectId {
                    api_version: "cert-manager.io/v1".into(),
                    kind: "Certificate".into(),
                    namespace: Some(p.namespace.clone()),
                    name: p.name.clone(),
                };
                let Some(cert) = kube.get(&r, &id).await.map_err(step_err)? else {
                    return Err(StepError::permanent(format!("there is no {id}")));
                };
                let revision = cert["status"]["revision"].clone();
                let mut conditions: Vec<Value> = cert["status"]["conditions"].as_array().cloned().unwrap_or_default();
                if conditions
                    .iter()
                    .any(|c| c["type"] == "Issuing" && c["status"] == "True")
                {
                    return Ok(json!({ "renewing": false, "revision": revision }));
                }
                conditions.retain(|c| c["type"] != "Issuing");
                conditions.push(json!({
                    "type": "Issuing", "status": "True", "reason": "ManuallyTriggered",
                    "message": format!("Certificate re-issuance manually triggered by dayshift ({}/{})", s.run_id, s.step),
                    "lastTransitionTime": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    "observedGeneration": cert["metadata"]["generation"],
                }));
                kube.merge_patch_status(&r, &id, &json!({ "status": { "conditions": conditions } }))
                    .await
                    .map_err(step_err)?;
                Ok(json!({ "renewing": true, "revision": revision }))
            }
            Action::TimeNow => {
                let _: serde_json::Map<String, Value> = parse(self, params)?;
                let now = chrono::Utc::now();
                Ok(json!({ "time": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "unix": now.timestamp() }))
            }
            Action::HttpRequest => {
                let p: HttpParams = parse(self, params)?;
                let endpoint = connections.http(&p.connection).map_err(StepError::permanent)?;
                let text = |v: &Value| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let request = crate::adapters::endpoint::Request {
                    method: p.method.unwrap_or_else(|| "GET".into()),
                    path: p.path.unwrap_or_default(),
                    query: p.query.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
                    headers: p.headers.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
                    body: p.body,
                    expect: p.expect,
                };
                endpoint.send(&request).await.map_err(step_err)
            }
            Action::VaultKvRead => {
                let p: KvReadParams = parse(self, params)?;
                let vault = vault_of(connections, &p.connection)?;
                let entry = vault
                    .kv_read(p.mount.as_deref().unwrap_or("secret"), &p.path)
                    .await
                    .map_err(step_err)?;
                let keys: Vec<&String> = entry.data.keys().collect();
                Ok(if p.values.unwrap_or(true) {
                    json!({ "version": entry.version, "keys": keys, "data": entry.data })
                } else {
                    json!({ "version": entry.version, "keys": keys })
                })
            }
            Action::VaultKvWrite => {
                let p: KvWriteParams = parse(self, params)?;
                let vault = vault_of(connections, &p.connection)?;
                let mount = p.mount.as_deref().unwrap_or("secret");
                match vault.kv_write(mount, &p.path, &p.data, p.cas).await {
                    Ok(version) => Ok(json!({ "version": version })),
                    Err(crate::adapters::vault::VaultError::Conflict { .. }) => {
                        // Our own write, whose answer was lost, or another writer's.
                        let current = vault.kv_read(mount, &p.path).await.map_err(step_err)?;
                        if current.version == p.cas + 1 && current.data == p.data {
                            Ok(json!({ "version": current.version }))
                        } else {
                            Err(changed_first(mount, &p.path, current.version, p.cas))
                        }
                    }
                    Err(e) => Err(step_err(e)),
                }
            }
            Action::PgQuery => {
                let p: PgQueryParams = parse(self, params)?;
                let limit = p.limit.unwrap_or(100);
                if !(1..=1000).contains(&limit) {
                    return Err(StepError::permanent("action postgres.query: limit must be 1 to 1000"));
                }
                let url = connections.postgres(&p.connection).map_err(StepError::permanent)?;
                let rows = crate::adapters::postgres::PgAdmin::new(url)
                    .read_only_rows(&p.sql, &p.params, limit)
                    .await
                    .map_err(step_err)?;
                Ok(json!({ "count": rows.len(), "rows": rows }))
            }
            Action::KubeApply => {
                let p: ApplyParams = parse(self, params)?;
                let m = match (&p.manifest, &p.repository, &p.path) {
                    (Some(m), None, None) => m,
                    (None, Some(repository), Some(path)) => {
                        let branch = p.branch.as_deref().unwrap_or("main");
                        let at = GitManifests {
                            repository,
                            branch,
                            path,
                            namespace: p.namespace.as_deref(),
                        };
                        return apply_from_git(connections, &p.connection, at).await;
                    }
                    _ => {
                        return Err(StepError::permanent(
                            "action kubernetes.apply: give either `manifest`, or `repository` and `path`",
                        ));
                    }
                };
                let text = |v: &Value| v.as_str().map(str::to_string);
                let (Some(api_version), Some(kind), Some(name)) =
                    (text(&m["apiVersion"]), text(&m["kind"]), text(&m["metadata"]["name"]))
                else {
                    return Err(StepError::permanent(
                        "action kubernetes.apply: the manifest needs apiVersion, kind and metadata.name",
                    ));
                };
                let namespace = text(&m["metadata"]["namespace"]);
                let object = KubeObject {
                    connection: p.connection.clone(),
                    api_version,
                    kind,
                    namespace,
                    name,
                };
                let (kube, r, _) = object.resolve(connections).await?;
                let applied = kube.apply(&r, m, "dayshift", false).await.map_err(step_err)?;
                Ok(json!({ "object": applied }))
            }
            Action::KubeLogs => {
                let p: LogsParams = parse(self, params)?;
                kube_name("namespace", &p.namespace)?;
                if let Some(c) = &p.container {
                    kube_name("container", c)?;
                }
                let lines = p.lines.unwrap_or(100);
                if !(1..=5000).contains(&lines) {
                    return Err(StepError::permanent("action kubernetes.logs: lines must be 1 to 5000"));
                }
                let kube = cluster(connections, &p.connection).await?;
                let pod = pick_pod(self, &kube, &p.namespace, &p.pod, &p.labels, false).await?;
                let logs = kube
                    .pod_log(&p.namespace, &pod, p.container.as_deref(), lines, p.previous)
                    .await
                    .map_err(step_err)?;
                Ok(json!({ "pod": pod, "logs": logs }))
            }
            Action::VaultKvGenerate => {
                let p: KvGenerateParams = parse(self, params)?;
                let generator = crate::secrets::Generator {
                    length: p.length.unwrap_or(32),
                    alphabet: p.alphabet.unwrap_or_else(|| "alphanumeric".into()),
                };
                generator
                    .check()
                    .map_err(|e| StepError::permanent(format!("action {}: {e}", self.name())))?;
                let vault = vault_of(connections, &p.connection)?;
                let mount = p.mount.as_deref().unwrap_or("secret");
                let mut data = if p.cas == 0 {
                    serde_json::Map::new()
                } else {
                    vault.kv_read_version(mount, &p.path, p.cas).await.map_err(step_err)?
                };
                // The entry's custom metadata names the run, the step and the version it writes,
                // set before the write: an attempt that finds its own mark on the version after
                // `cas` is a repeat whose answer was lost, and makes no other secret.
                let marker = format!("{}/{}:{}", s.run_id, s.step, p.cas + 1);
                let meta = match vault.kv_custom_metadata(mount, &p.path).await {
                    Ok(meta) => meta,
                    // An entry to create has no metadata yet.
                    Err(_) if p.cas == 0 => Default::default(),
                    Err(e) => return Err(step_err(e)),
                };
                if meta.get(GENERATED_BY) == Some(&marker) {
                    let current = vault.kv_read(mount, &p.path).await.map_err(step_err)?;
                    if current.version == p.cas + 1 {
                        return Ok(json!({ "version": current.version }));
                    }
                }
                data.insert(p.key.clone(), Value::String(generator.generate()));
                vault
                    .kv_update_custom_metadata(mount, &p.path, &[(GENERATED_BY, Some(&marker))])
                    .await
                    .map_err(step_err)?;
                match vault.kv_write(mount, &p.path, &data, p.cas).await {
                    Ok(version) => Ok(json!({ "version": version })),
                    Err(crate::adapters::vault::VaultError::Conflict { .. }) => {
                        let current = vault.kv_read(mount, &p.path).await.map_err(step_err)?;
                        Err(changed_first(mount, &p.path, current.version, p.cas))
                    }
                    Err(e) => Err(step_err(e)),
                }
            }
            Action::Assert => {
                let p: AssertParams = parse(self, params)?;
                match p.that {
                    Value::Bool(true) => Ok(json!({ "held": true })),
                    Value::Bool(false) => Err(StepError::permanent(p.message)),
                    other => Err(StepError::permanent(format!(
                        "action assert: `that` must be true or false, not {other} ({})",
                        p.message
                    ))),
                }
            }
            Action::KubeRestart => {
                let p: WorkloadParams = parse(self, params)?;
                let (kube, w) = p.resolve(connections).await?;
                kube.rollout_restart(&w, &format!("dayshift {}/{}", s.run_id, s.step))
                    .await
                    .map_err(step_err)?;
                Ok(json!({ "restarted": w.to_string() }))
            }
            Action::KubeScale => {
                let p: ScaleParams = parse(self, params)?;
                if !(0..=1000).contains(&p.replicas) {
                    return Err(StepError::permanent(format!(
                        "action {}: replicas must be 0 to 1000, not {}",
                        self.name(),
                        p.replicas
                    )));
                }
                let (kube, w) = p.workload.resolve(connections).await?;
                let previous = kube.replicas(&w).await.map_err(step_err)?;
                kube.scale(&w, p.replicas as i32).await.map_err(step_err)?;
                Ok(json!({ "replicas": p.replicas, "previous": previous }))
            }
        }
    }
}

/// Whether `s` is a Kubernetes name (DNS subdomain: lowercase letters, digits, `-` and `.`).
fn kube_name(what: &str, s: &str) -> Result<(), StepError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(StepError::permanent(format!("{what} {s:?} is not a Kubernetes name")))
    }
}

/// The pod a step acts in: `pod`, by name, or the first pod by name matching `labels`; with
/// `running`, the first Running one (none running is retried: the pod may be restarting).
async fn pick_pod(
    action: Action,
    kube: &Kube,
    namespace: &str,
    pod: &Option<String>,
    labels: &Option<String>,
    running: bool,
) -> Result<String, StepError> {
    match (pod, labels) {
        (Some(pod), None) => {
            kube_name("pod", pod)?;
            Ok(pod.clone())
        }
        (None, Some(labels)) => {
            let pods = crate::adapters::kube::Resource::builtin("v1", "Pod").expect("Pod is built in");
            let mut names: Vec<String> = kube
                .list(&pods, Some(namespace), Some(labels), 500)
                .await
                .map_err(step_err)?
                .iter()
                .filter(|o| {
                    !running || (o["status"]["phase"] == "Running" && o["metadata"]["deletionTimestamp"].is_null())
                })
                .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            names.sort();
            match names.into_iter().next() {
                Some(first) => Ok(first),
                None if running => Err(StepError::transient(format!(
                    "no Running pod in {namespace} matches {labels}"
                ))),
                None => Err(StepError::permanent(format!("no pod in {namespace} matches {labels}"))),
            }
        }
        _ => Err(StepError::permanent(format!(
            "action {}: give either `pod` or `labels`",
            action.name()
        ))),
    }
}

/// The Vault `connections.vault` names `name`.
fn vault_of(connections: &Connections, name: &str) -> Result<crate::adapters::vault::Vault, StepError> {
    let config = connections.vault(name).map_err(StepError::permanent)?;
    Ok(crate::adapters::vault::Vault::new(config.clone()))
}

/// A check-and-set write refused: the entry moved past `cas` under another writer.
fn changed_first(mount: &str, path: &str, version: u64, cas: u64) -> StepError {
    StepError::permanent(format!(
        "{mount}/{path}: it is at version {version}, not {cas}: another writer changed it first"
    ))
}

/// The KV v2 custom metadata key naming the run, step and version of a generated secret.
const GENERATED_BY: &str = "dayshift-generated-by";

fn default_cluster() -> String {
    "default".into()
}

async fn cluster(connections: &Connections, name: &str) -> Result<Kube, StepError> {
    let config = connections.kubernetes(name).map_err(StepError::permanent)?;
    Kube::connect(config).await.map_err(step_err)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KubeObject {
    #[serde(default = "default_cluster")]
    connection: String,
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
}

impl KubeObject {
    async fn resolve(
        &self,
        connections: &Connections,
    ) -> Result<(Kube, crate::adapters::kube::Resource, ObjectId), StepError> {
        kube_name("name", &self.name)?;
        if let Some(ns) = &self.namespace {
            kube_name("namespace", ns)?;
        }
        let kube = cluster(connections, &self.connection).await?;
        let r = kube.resource(&self.api_version, &self.kind).await.map_err(step_err)?;
        if r.namespaced != self.namespace.is_some() {
            return Err(StepError::permanent(format!(
                "{} is {}, so it needs {}",
                self.kind,
                if r.namespaced { "namespaced" } else { "cluster-wide" },
                if r.namespaced { "a namespace" } else { "no namespace" }
            )));
        }
        let id = ObjectId {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        };
        Ok((kube, r, id))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KubeObjectParams {
    #[serde(flatten)]
    object: KubeObject,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KubeWaitParams {
    #[serde(flatten)]
    object: KubeObject,
    #[serde(default)]
    condition: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    changed_from: Option<Value>,
    #[serde(default)]
    equals: Option<Value>,
    /// With `equals`: values of the field that end the wait as a failure.
    #[serde(default)]
    fails_on: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KubeListParams {
    #[serde(default = "default_cluster")]
    connection: String,
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KubePatchParams {
    #[serde(flatten)]
    object: KubeObject,
    patch: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KubeObjectOnly {
    #[serde(flatten)]
    object: KubeObject,
}

/// An ArgoCD Application, by namespace (default `argocd`) and name.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ArgoApp {
    #[serde(default = "default_cluster")]
    connection: String,
    #[serde(default = "argocd_namespace")]
    namespace: String,
    name: String,
}

fn argocd_namespace() -> String {
    "argocd".into()
}

impl ArgoApp {
    async fn resolve(
        &self,
        connections: &Connections,
    ) -> Result<(Kube, crate::adapters::kube::Resource, ObjectId), StepError> {
        kube_name("namespace", &self.namespace)?;
        kube_name("name", &self.name)?;
        let kube = cluster(connections, &self.connection).await?;
        // Applications are ArgoCD's CRD; its shape is known, so no discovery is needed.
        let r = crate::adapters::kube::Resource {
            api_version: "argoproj.io/v1alpha1".into(),
            kind: "Application".into(),
            plural: "applications".into(),
            namespaced: true,
        };
        let id = ObjectId {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: Some(self.namespace.clone()),
            name: self.name.clone(),
        };
        Ok((kube, r, id))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgoSyncParams {
    #[serde(flatten)]
    app: ArgoApp,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    prune: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgoWaitParams {
    #[serde(flatten)]
    app: ArgoApp,
    #[serde(default)]
    revision: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyParams {
    #[serde(default = "default_cluster")]
    connection: String,
    #[serde(default)]
    manifest: Option<Value>,
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// Where `kubernetes.apply` reads its objects from, in git.
struct GitManifests<'a> {
    repository: &'a str,
    branch: &'a str,
    path: &'a str,
    /// The namespace of the namespaced objects that name none.
    namespace: Option<&'a str>,
}

/// `kubernetes.apply` of the objects at `path` on `branch` of git `repository`, in order.
async fn apply_from_git(
    connections: &Connections,
    cluster_name: &str,
    GitManifests {
        repository,
        branch,
        path,
        namespace,
    }: GitManifests<'_>,
) -> Result<Value, StepError> {
    if let Some(ns) = namespace {
        kube_name("namespace", ns)?;
    }
    let git = connections.git(repository).map_err(StepError::permanent)?;
    let checkout = git.checkout(branch).await?;
    let at = checkout.inside(path).map_err(StepError::permanent)?;
    let docs = crate::component::manifests::read(&at).map_err(|e| {
        // Named as in the repository, not by the temporary checkout's path.
        let dir = checkout.dir().display().to_string();
        StepError::permanent(format!(
            "{repository} on {branch}: {}",
            e.to_string().replace(&format!("{dir}/"), "")
        ))
    })?;
    let commit = checkout.head().await?;
    drop(checkout);
    let kube = cluster(connections, cluster_name).await?;
    let mut applied = Vec::new();
    for doc in &docs {
        let mut m = doc.object.clone();
        let text = |v: &Value| v.as_str().map(str::to_string);
        let object = KubeObject {
            connection: cluster_name.to_string(),
            api_version: text(&m["apiVersion"]).unwrap_or_default(),
            kind: text(&m["kind"]).unwrap_or_default(),
            namespace: text(&m["metadata"]["namespace"]),
            name: text(&m["metadata"]["name"]).unwrap_or_default(),
        };
        kube_name("name", &object.name)?;
        if let Some(ns) = &object.namespace {
            kube_name("namespace", ns)?;
        }
        let r = kube
            .resource(&object.api_version, &object.kind)
            .await
            .map_err(step_err)?;
        let mut object = object;
        if r.namespaced
            && object.namespace.is_none()
            && let Some(ns) = namespace
        {
            m["metadata"]["namespace"] = json!(ns);
            object.namespace = Some(ns.to_string());
        }
        if r.namespaced != object.namespace.is_some() {
            return Err(StepError::permanent(format!(
                "{}: {} is {}, so it needs {}",
                doc.at.replace(&format!("{}/", at.display()), ""),
                object.kind,
                if r.namespaced { "namespaced" } else { "cluster-wide" },
                if r.namespaced { "a namespace" } else { "no namespace" }
            )));
        }
        kube.apply(&r, &m, "dayshift", false).await.map_err(step_err)?;
        applied.push(format!(
            "{} {}{}",
            object.kind,
            object.namespace.map(|n| format!("{n}/")).unwrap_or_default(),
            object.name
        ));
    }
    Ok(json!({ "applied": applied, "commit": commit }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsParams {
    #[serde(default = "default_cluster")]
    connection: String,
    namespace: String,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    lines: Option<i64>,
    #[serde(default)]
    previous: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvGenerateParams {
    connection: String,
    #[serde(default)]
    mount: Option<String>,
    path: String,
    key: String,
    cas: u64,
    #[serde(default)]
    length: Option<usize>,
    #[serde(default)]
    alphabet: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvReadParams {
    connection: String,
    #[serde(default)]
    mount: Option<String>,
    path: String,
    #[serde(default)]
    values: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvWriteParams {
    connection: String,
    #[serde(default)]
    mount: Option<String>,
    path: String,
    data: serde_json::Map<String, Value>,
    cas: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PgQueryParams {
    connection: String,
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpParams {
    connection: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    query: serde_json::Map<String, Value>,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    expect: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertParams {
    #[serde(default = "default_cluster")]
    connection: String,
    namespace: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecParams {
    #[serde(default = "default_cluster")]
    connection: String,
    namespace: String,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    container: Option<String>,
    command: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromQueryParams {
    #[serde(default = "default_cluster")]
    connection: String,
    query: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssertParams {
    that: Value,
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KubeAnnotateParams {
    #[serde(flatten)]
    object: KubeObject,
    annotations: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct WorkloadParams {
    #[serde(default = "default_cluster")]
    connection: String,
    #[serde(default)]
    kind: Option<WorkloadKind>,
    namespace: String,
    name: String,
}

impl WorkloadParams {
    async fn resolve(&self, connections: &Connections) -> Result<(Kube, Workload), StepError> {
        kube_name("namespace", &self.namespace)?;
        kube_name("name", &self.name)?;
        let w = Workload {
            kind: self.kind.unwrap_or(WorkloadKind::Deployment),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        };
        Ok((cluster(connections, &self.connection).await?, w))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ScaleParams {
    #[serde(flatten)]
    workload: WorkloadParams,
    replicas: i64,
}

fn parse<T: serde::de::DeserializeOwned>(action: Action, params: Value) -> Result<T, StepError> {
    serde_json::from_value(params).map_err(|e| StepError::permanent(format!("action {}: {e}", action.name())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    message: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyParams {
    connection: String,
    text: String,
}
