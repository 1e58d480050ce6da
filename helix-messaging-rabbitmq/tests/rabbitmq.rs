//! RabbitMQ-specific behaviour against the real server.

mod common;

use futures::StreamExt;
use helix_messaging_core::{Broker, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_rabbitmq::RabbitBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_no_queue_can_take_is_an_error_not_a_silent_ack() {
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("unroutable");
    let err = broker
        .publish(&topic, Message::new("nobody is bound"))
        .await
        .expect_err("unroutable publish");
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("unroutable"), "{err}");

    let report = broker
        .publish_batch(&topic, vec![Message::new("a"), Message::new("b")])
        .await;
    assert_eq!(
        report.failures().len(),
        2,
        "every message of the batch is reported"
    );

    // Once a group exists the same topic is routable.
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(helix_messaging_testkit::fresh_name("g")),
        )
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("now routable"))
        .await
        .unwrap();
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), b"now routable");
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dropped_unacked_comes_back_as_a_redelivery() {
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("redelivered");
    let group = helix_messaging_testkit::fresh_name("g");
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    broker.publish(&topic, Message::new("x")).await.unwrap();
    let held = common::recv(&mut first).await;
    assert_eq!(held.attempt(), 1);
    drop(held);
    drop(first);
    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let again = common::recv(&mut second).await;
    assert!(
        again.info().redelivered,
        "RabbitMQ flags the native redelivery"
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_can_be_acked_after_its_subscription_is_dropped() {
    // `subscription.take(n).for_each_concurrent(..)` drops the stream while the last acks are
    // still running; those acks must reach the broker, not fail on a closed channel.
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("late-ack");
    let group = helix_messaging_testkit::fresh_name("g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    broker.publish(&topic, Message::new("x")).await.unwrap();
    let held = common::recv(&mut sub).await;
    drop(sub);
    held.ack()
        .await
        .expect("ack after the subscription was dropped");
    drop(held);

    let mut next = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(500), next.next()).await;
    assert!(quiet.is_err(), "the acked message is gone for good");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_priority_queues_the_backend_does_not_claim_priority() {
    let mut config = common::config();
    config.max_priority = 0;
    let broker = RabbitBroker::connect(config).await.unwrap();
    assert!(!broker.capabilities().priority);
    let topic = helix_messaging_testkit::fresh_name("plain");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("x").with_priority(9))
        .await
        .unwrap();
    common::recv(&mut sub).await.ack().await.unwrap();
    broker.close().await.unwrap();
}
