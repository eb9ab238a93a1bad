//! A real browser for the console's end-to-end tests: Debian's Chromium, headless, driven
//! through its ChromeDriver over WebDriver ([`fantoccini`]). Each [`Browser`] has its own
//! ChromeDriver (killed on drop) and one window of a laptop's size.
//!
//! Waits are for conditions in the page (an element, a text, a script returning true),
//! never for a fixed time.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long a page gets to show what a test waits for.
pub const PAGE_LIMIT: Duration = Duration::from_secs(30);

/// The colour scheme the browser reports to the page (`prefers-color-scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Light,
    Dark,
}

pub struct Browser {
    pub client: Client,
    /// The console's address, e.g. `http://127.0.0.1:4321/console/`.
    pub console: String,
    _driver: tokio::process::Child,
    /// Chromium's profile, removed on drop (ChromeDriver's own would be left in the temp
    /// directory when the driver is killed).
    profile: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium window (1440×900) on the console of the
    /// `dayshift serve` at `api`.
    pub async fn start(api: &str, scheme: Scheme) -> Self {
        let port = crate::free_port();
        let driver =
            tokio::process::Command::new(std::env::var("DAYSHIFT_CHROMEDRIVER").unwrap_or("chromedriver".into()))
                .arg(format!("--port={port}"))
                .env("TZ", "UTC")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                // Its own process group, with the browser it starts: dropping the Browser
                // kills them all, even when a failed test never closes the session.
                .process_group(0)
                .spawn()
                .expect("chromedriver runs (scripts/services.sh installs chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + PAGE_LIMIT;
        loop {
            let ready = http.get(format!("{url}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = std::env::temp_dir().join(format!("dayshift-chromium-{}", crate::unique()));
        let user_data_dir = format!("--user-data-dir={}", profile.display());
        let mut args = vec![
            user_data_dir.as_str(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1440,900",
            "--hide-scrollbars",
            "--lang=en-GB",
        ];
        if scheme == Scheme::Dark {
            args.push("--force-dark-mode");
            args.push("--blink-settings=preferredColorScheme=0");
        }
        let binary = std::env::var("DAYSHIFT_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
        let caps = json!({ "browserName": "chrome", "goog:chromeOptions": { "binary": binary, "args": args } });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.enforce_http(true);
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session through chromedriver");
        let browser = Self {
            client,
            console: format!("{api}/console/"),
            _driver: driver,
            profile,
        };
        let dark: bool = browser
            .script("return matchMedia('(prefers-color-scheme: dark)').matches")
            .await
            .as_bool()
            .unwrap_or(false);
        assert_eq!(
            dark,
            scheme == Scheme::Dark,
            "the browser reports the wrong colour scheme"
        );
        browser
    }

    /// Opens the console at `route` (e.g. `#/runs`).
    pub async fn open(&self, route: &str) {
        self.client
            .goto(&format!("{}{route}", self.console))
            .await
            .expect("navigate");
    }

    /// Signs in through the sign-in form, as a person does, and waits for the runs page.
    pub async fn sign_in(&self, token: &str) {
        self.open("#/runs").await;
        self.type_into("#token", token).await;
        self.click("form.sign-in button[type=submit]").await;
        self.find("#user .who").await;
    }

    /// The first element matching `css`, once there is one.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PAGE_LIMIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element '{css}' appeared: {e}"))
    }

    /// Whether an element matches `css` now.
    pub async fn has(&self, css: &str) -> bool {
        !self.client.find_all(Locator::Css(css)).await.unwrap().is_empty()
    }

    /// Clicks the first element matching `css`, once there is one.
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click '{css}': {e}"));
    }

    /// Types `text` into the first element matching `css`, once there is one.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.find(css)
            .await
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into '{css}': {e}"));
    }

    /// The text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    /// Waits until the first element matching `css` contains `text`; returns its text.
    pub async fn wait_text(&self, css: &str, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + PAGE_LIMIT;
        loop {
            let now: Value = self
                .script_with(
                    "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                    vec![json!(css)],
                )
                .await;
            if let Some(t) = now.as_str()
                && t.contains(text)
            {
                return t.to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "'{css}' did not come to contain {text:?}; it shows {now}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `script` (a function body) in the page; its return value.
    pub async fn script(&self, script: &str) -> Value {
        self.script_with(script, Vec::new()).await
    }

    pub async fn script_with(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Saves a screenshot of the window as `docs/console/NAME.png`, for the README.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = docs_console();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// The accessibility violations axe-core finds on the page as shown (WCAG 2.1 A and AA:
    /// labels, contrast, landmarks, names, ARIA), as `rule: element: why` lines.
    pub async fn accessibility_violations(&self) -> Vec<String> {
        let loaded = self.script("return typeof window.axe === 'object'").await;
        if loaded != true {
            let path = std::env::var("DAYSHIFT_AXE_JS").unwrap_or_else(|_| {
                panic!("DAYSHIFT_AXE_JS is not set: source .dayshift/env (scripts/services.sh up fetches axe-core)")
            });
            let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            self.script(&format!("{source}\nreturn true;")).await;
        }
        let found = self
            .script(
                "return axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } })\
                   .then(r => r.violations.flatMap(v => v.nodes.map(n => `${v.id}: ${n.target.join(' ')}: ${n.failureSummary}`)));",
            )
            .await;
        serde_json::from_value(found).unwrap()
    }

    /// Presses and releases `key` (a WebDriver key, e.g. `\u{E004}` for Tab), as a keyboard
    /// does: the browser moves the focus or activates what has it.
    pub async fn press(&self, key: char) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key })
            .then(KeyAction::Up { value: key });
        self.client.perform_actions(keys).await.unwrap();
    }

    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self._driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Where the tests leave the console's screenshots: `docs/console/` of the repository.
pub fn docs_console() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console")
}
