//! The data-flow graph as a user sees it: nodes, edges, channel groups, text and DOT.
use distill::graph::{Axis, ChannelRule, Graph, NodeKind};
use distill::models::create_model;
use distill::summary::tables::column;
use tch::Device;

fn strings(df: &distill::polars::prelude::DataFrame, name: &str) -> Vec<String> {
    column(df, name).unwrap().str().unwrap().iter().map(|v| v.unwrap_or("").to_string()).collect()
}

#[test]
fn lenet_graph_frames_text_and_dot() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let graph = Graph::trace(&mut model).unwrap();
    let nodes = graph.nodes_frame().unwrap();
    assert_eq!(strings(&nodes, "Node"), ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2", "relu4", "fc3"]);
    assert_eq!(strings(&nodes, "Inputs")[0], "<input>");
    assert_eq!(strings(&nodes, "Inputs")[7], "flatten");
    assert_eq!(strings(&nodes, "Output shape")[6], "(1, 400)");
    assert_eq!(strings(&nodes, "Channel rule")[..4], ["mix", "elementwise", "elementwise", "mix"]);
    let groups: Vec<Option<i64>> = column(&nodes, "Output group").unwrap().i64().unwrap().iter().collect();
    assert_eq!(groups, [1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 5].map(Some));
    let edges = graph.edges_frame().unwrap();
    assert_eq!(edges.height(), 12);
    assert_eq!((strings(&edges, "From")[7].as_str(), strings(&edges, "To")[7].as_str(), strings(&edges, "Shape")[7].as_str()), ("flatten", "fc1", "(1, 400)"));
    let text = graph.to_string();
    assert_eq!(text.lines().count(), 12);
    assert!(text.lines().nth(7).unwrap().contains("fc1") && text.lines().nth(7).unwrap().contains("<- flatten"), "{text}");
    let dot = graph.to_dot();
    assert!(dot.starts_with("digraph model {") && dot.contains("\"pool2\" -> \"flatten\" [label=\"(1, 16, 5, 5)\"]"), "{dot}");
    let channels = graph.channels();
    let frame = channels.groups_frame().unwrap();
    assert_eq!(strings(&frame, "Members")[2], "conv2 filters, fc1 channels (blocks of 25)");
    assert_eq!(strings(&frame, "Fixed by"), ["the model's input", "", "", "", "", "the model's output"]);
    let g = channels.group_of("fc1", Axis::Channels).unwrap();
    assert_eq!((g.id, g.classes.len()), (2, 16));
}

#[test]
fn every_zoo_model_traces_with_known_rules_only() {
    for dataset in ["mnist", "cifar10"] {
        for arch in distill::models::architectures(Some(dataset)) {
            let mut model = create_model(arch, dataset, Device::Cpu).unwrap();
            let graph = Graph::trace(&mut model).unwrap();
            for node in graph.nodes() {
                assert!(!matches!(node.rule, ChannelRule::Opaque(_)), "{arch}: {} is opaque: {:?}", node.name, node.rule);
                assert!(node.kind != NodeKind::Unrecorded, "{arch}: {}", node.name);
            }
            let leaves = model.named_modules().into_iter().filter(|m| m.is_leaf && !m.name.is_empty()).count();
            let modules = graph.nodes().iter().filter(|n| matches!(n.kind, NodeKind::Module(_))).count();
            assert_eq!(modules, leaves, "{arch}: every leaf module runs once");
        }
    }
}
