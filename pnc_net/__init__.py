"""pnc: partial network cloning.

A *target* zoo network gains some classes of a *source* zoo network without a
single pretrained weight changing. What travels between machines is a small
package ``<masks, R, adapter, fusion gate>``; every node already holds the zoo.

Typical use::

    from pnc_net import Zoo, load_mnist, clone, CloneConfig, build_superbody
    zoo = Zoo.default()
    data = load_mnist()
    result = clone(zoo, data, CloneConfig(target="mnist-cnn-0to4",
                                          source="mnist-cnn-5to9",
                                          cloned_classes=("5", "6")))
    superbody = build_superbody(zoo, result.package)
"""

__version__ = "0.1.0"
