//! The test stack itself works: OpenBao answers, and its database engine issues PostgreSQL users
//! that can really log in.

use sidekey_tests::Stack;

#[tokio::test]
async fn database_engine_issues_users_that_can_log_in() {
    let stack = Stack::shared();
    let creds = stack.api("GET", "database/creds/app", None).await.unwrap();
    let user = creds["data"]["username"].as_str().unwrap();
    let password = creds["data"]["password"].as_str().unwrap();
    assert!(stack.pg_role_exists(user).unwrap());
    assert_eq!(stack.psql_as(user, password, "select 42").unwrap(), "42");
    assert!(stack.psql_as(user, "wrong-password", "select 1").is_err());
}

#[tokio::test]
async fn service_account_tokens_log_in_through_the_kubernetes_mount() {
    let stack = Stack::shared();
    let login = stack
        .api(
            "POST",
            "auth/kubernetes/login",
            Some(serde_json::json!({ "role": "app", "jwt": stack.sa_token() })),
        )
        .await
        .unwrap();
    let policies = login["auth"]["policies"].as_array().unwrap();
    assert!(policies.iter().any(|p| p == "app"), "{login}");
}
