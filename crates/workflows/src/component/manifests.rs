//! Reading a component's manifests: a directory of YAML files (in name order), a kustomize
//! directory (rendered by `kubectl kustomize`, or `kustomize build`), or one file (e.g. what
//! `helm template` printed). Errors name the file, the document and what is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::adapters::kube::{ObjectId, Resource};

dayshift_engine::message_error!(
    /// Manifests that cannot be read or rendered.
    ManifestError
);

/// The label naming the component an object belongs to; with the field manager, what makes an
/// object dayshift's to prune.
pub const COMPONENT_LABEL: &str = "dayshift.io/component";

/// One object read from the manifests, with where it came from.
#[derive(Debug, Clone)]
pub struct Doc {
    /// `file (document n)`.
    pub at: String,
    pub object: Value,
}

/// The files a kustomize directory is recognised by.
const KUSTOMIZATIONS: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Every object in the manifests at `path`, in order; each has apiVersion, kind and a name.
pub fn read(path: &Path) -> Result<Vec<Doc>, ManifestError> {
    if path.is_dir() && KUSTOMIZATIONS.iter().any(|k| path.join(k).is_file()) {
        let text = kustomize(path)?;
        return parse(&format!("{} (kustomize output)", path.display()), &text);
    }
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(format!("{}: no .yaml files", path.display()).into());
    }
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        out.extend(parse(&file.display().to_string(), &text)?);
    }
    if out.is_empty() {
        return Err(format!("{}: no Kubernetes objects", path.display()).into());
    }
    Ok(out)
}

fn parse(name: &str, text: &str) -> Result<Vec<Doc>, ManifestError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError(format!("{name} is not valid YAML: {e}")))?;
    let mut out = Vec::new();
    for (n, object) in docs.into_iter().enumerate() {
        if object.is_null() {
            continue;
        }
        let at = format!("{name} (document {})", n + 1);
        if !object.is_object()
            || object["apiVersion"].as_str().is_none_or(str::is_empty)
            || object["kind"].as_str().is_none_or(str::is_empty)
            || object["metadata"]["name"].as_str().is_none_or(str::is_empty)
        {
            return Err(ManifestError(format!(
                "{at}: an object needs apiVersion, kind and metadata.name"
            )));
        }
        if object["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            return Err(ManifestError(format!(
                "{at}: a {} is not applied as such; list its items as documents",
                object["kind"]
            )));
        }
        out.push(Doc { at, object });
    }
    Ok(out)
}

/// Renders a kustomize directory with `kubectl kustomize`, or `kustomize build` without kubectl.
fn kustomize(dir: &Path) -> Result<String, ManifestError> {
    let tools: [(&str, &[&str]); 2] = [("kubectl", &["kustomize"]), ("kustomize", &["build"])];
    for (tool, args) in tools {
        let output = match Command::new(tool).args(args).arg(dir).output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ManifestError::from(format!("{}: running {tool}: {e}", dir.display()))),
        };
        if !output.status.success() {
            return Err(ManifestError::from(format!(
                "{}: {tool} {} failed: {}",
                dir.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        return String::from_utf8(output.stdout)
            .map_err(|e| ManifestError(format!("{}: kustomize output: {e}", dir.display())));
    }
    Err(ManifestError::from(format!(
        "{} is a kustomize directory, and rendering it needs kubectl or kustomize, neither of which is on PATH",
        dir.display()
    )))
}

/// The kind of every document: a built-in kind, one a CustomResourceDefinition in the manifests
/// defines, or one the cluster's CRDs (`cluster`, asked only when needed) define. An error
/// reading the cluster's CRDs is returned as it says.
pub async fn resolve<F, Fut, E>(docs: &[Doc], cluster: F) -> Result<Vec<Resource>, ManifestError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Value>, E>>,
    E: std::fmt::Display,
{
    let mut known: Vec<Resource> = docs
        .iter()
        .filter(|d| d.object["kind"] == "CustomResourceDefinition")
        .flat_map(|d| Resource::from_crd(&d.object))
        .collect();
    let find = |known: &[Resource], d: &Doc| {
        let (api_version, kind) = (
            d.object["apiVersion"].as_str().unwrap_or_default(),
            d.object["kind"].as_str().unwrap_or_default(),
        );
        Resource::builtin(api_version, kind).or_else(|| {
            known
                .iter()
                .find(|r| r.api_version == api_version && r.kind == kind)
                .cloned()
        })
    };
    if docs.iter().any(|d| find(&known, d).is_none()) {
        let crds = cluster().await.map_err(|e| ManifestError(e.to_string()))?;
        known.extend(crds.iter().flat_map(Resource::from_crd));
    }
    docs.iter()
        .map(|d| {
            find(&known, d).ok_or_else(|| {
                ManifestError(format!(
                    "{}: kind {} ({}) is not one the cluster serves: it is not built in, and no CustomResourceDefinition in the manifests or the cluster defines it",
                    d.at,
                    d.object["kind"].as_str().unwrap_or_default(),
                    d.object["apiVersion"].as_str().unwrap_or_default()
                ))
            })
        })
        .collect()
}

/// The objects as dayshift applies them: a namespaced object without a namespace gets
/// `namespace`, a cluster-scoped one loses any, and every one carries the component's labels.
pub fn prepare(docs: &[Doc], kinds: &[Resource], component: &str, namespace: &str) -> Vec<Value> {
    docs.iter()
        .zip(kinds)
        .map(|(d, r)| {
            let mut o = d.object.clone();
            let meta = o["metadata"].as_object_mut().expect("checked by read");
            if !r.namespaced {
                meta.remove("namespace");
            } else if meta.get("namespace").and_then(Value::as_str).is_none() {
                meta.insert("namespace".into(), json!(namespace));
            }
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!("dayshift");
            o["metadata"]["labels"][COMPONENT_LABEL] = json!(component);
            o
        })
        .collect()
}

/// A digest of the prepared objects: later steps check that the manifests they read are the
/// ones the run checked.
pub fn digest(objects: &[Value]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for o in objects {
        h.update(o.to_string().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The identities of `objects`.
pub fn ids(objects: &[Value]) -> Vec<ObjectId> {
    objects.iter().map(ObjectId::of).collect()
}
